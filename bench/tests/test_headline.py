"""bench.headline's row shapes and arguments (the measurement itself runs in `make bench`)."""

import pytest

from bench import headline


def test_text_figures_keep_the_core_s_names_of_each_text():
    scores = {"ppl_sotu": 40.0, "ppl_sotu_se": 1.5, "ppl_moby": 120.0, "ppl_moby_se": 6.0, "kl": 0.4,
              "windows": {"split": "test"}}
    assert headline.text_figures(scores) == {"ppl_sotu": 40.0, "ppl_sotu_se": 1.5, "ppl_moby": 120.0,
                                             "ppl_moby_se": 6.0}
    assert headline.text_figures(scores, "_posttrained") == {
        "ppl_sotu_posttrained": 40.0, "ppl_sotu_posttrained_se": 1.5, "ppl_moby_posttrained": 120.0,
        "ppl_moby_posttrained_se": 6.0}


def test_the_out_of_domain_texts_are_the_default_split_s():
    from darwinlm.core.data.default_corpus import EVALUATION_LABELS, IN_DOMAIN_SET

    assert headline.OOD_TEXTS == ["moby"] and IN_DOMAIN_SET == "sotu"
    assert set(EVALUATION_LABELS) == {IN_DOMAIN_SET, *headline.OOD_TEXTS}


def test_a_seeded_row_is_the_mean_with_its_spread_and_keeps_every_seed():
    rows = [{"seed": 0, "ppl_sotu": 50.0, "ppl_sotu_se": 2.0, "params_kept": 100, "start": "informed"},
            {"seed": 1, "ppl_sotu": 60.0, "ppl_sotu_se": 4.0, "params_kept": 100, "start": "uniform"}]
    mean = headline.seed_mean(rows)
    assert mean["ppl_sotu"] == 55.0 and mean["ppl_sotu_sd"] == 5.0 and mean["ppl_sotu_se"] == 3.0
    assert "ppl_sotu_se_sd" not in mean and "params_kept_sd" not in mean and "seed" not in mean
    assert "start" not in mean and mean["seeds"] == rows


def test_the_darwinlm_row_is_the_demo_preset_at_the_target():
    from darwinlm.core.config import load_preset

    config = headline.headline_preset("smollm2", 0.3)
    demo = load_preset("smollm2-demo")
    assert config.search.fraction_removed == 0.3
    assert config.search.generations == demo.search.generations and config.data == demo.data
    assert config.post_train == demo.post_train


@pytest.mark.parametrize("argv", [["--targets", "0.5,x"], ["--targets", "1.2"], ["--seeds", "a"]])
def test_bad_arguments_stop_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        headline.parse_arguments(argv)
    assert stopped.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_defaults_are_the_headline_s():
    args = headline.parse_arguments([])
    assert (args.targets, args.seeds, args.results) == ([0.5, 0.3], [0, 1, 2], "headline")


def test_every_peer_has_a_row_and_a_place_in_the_report():
    from bench import report
    from bench.peers import PEER_METHODS

    assert set(headline.PEERS) == set(PEER_METHODS)
    assert {"flap", "slimgpt", "ziplm_dp", "shortgpt", "wanda_sp", "tp_taylor_uniform", "tp_global"} <= set(headline.PEERS)
    assert [method for method in report.METHODS if method in headline.PEERS] == list(headline.PEERS)
    assert "bench/peers" in headline.MEASURED_BY  # a peer's code change invalidates saved rows


def test_a_peer_row_carries_every_key_of_the_other_rows(monkeypatch):
    """peer_row on a stand-in target: the peer's kept parameters and wall time, figures before and after the
    same post-training (rows, teacher and schedule of the preset), ziplm_dp handed the target's database."""
    import torch

    from bench.peers import PeerResult

    calls = {}

    def fake_prune(method, model, rows, kept_fraction, **options):
        calls.update(method=method, rows=rows, kept_fraction=kept_fraction, options=options)
        return PeerResult(50, 100, 1.5)

    def fake_finetune(model, rows, schedule, teacher=None, progress=False):
        calls.update(post_rows=rows, schedule=schedule, teacher=teacher)

    monkeypatch.setattr("bench.peers.prune_with", fake_prune)
    monkeypatch.setattr("darwinlm.core.model.loading.load_model", lambda name: ("model", None))
    monkeypatch.setattr("darwinlm.core.search.finetune.finetune", fake_finetune)
    target = headline.Target.__new__(headline.Target)
    target.model_name, target.config = "smollm2", headline.headline_preset("smollm2", 0.3)
    target.data = type("Data", (), {"calibration_ids": torch.zeros(2, 4), "post_train_ids": torch.ones(3, 4)})()
    target.database, target.post_teacher = "the database", "the teacher"
    target.evaluate = lambda model, suffix="": {f"ppl_sotu{suffix}": 10.0, f"ppl_sotu{suffix}_se": 1.0}
    row = target.peer_row("ziplm_dp")
    assert calls["method"] == "ziplm_dp" and calls["options"] == {"database": "the database"}
    assert calls["kept_fraction"] == pytest.approx(0.7) and calls["rows"] is target.data.calibration_ids
    assert calls["post_rows"] is target.data.post_train_ids and calls["teacher"] == "the teacher"
    assert calls["schedule"] == target.config.post_train.finetune
    assert set(row) == {"params_kept", "wall_s", "post_train_s", "ppl_sotu", "ppl_sotu_se", "ppl_sotu_posttrained",
                        "ppl_sotu_posttrained_se"}
    assert (row["params_kept"], row["wall_s"]) == (50, 1.5)
    target.peer_row("flap")
    assert calls["options"] == {}
