"""bench.headline's row shapes and arguments, and each row's llama.cpp speed on tiny models (the measurement itself
runs in `make bench`)."""

from pathlib import Path

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


def test_rows_are_read_one_shot_on_sotu_and_moby_and_post_trained_on_every_text():
    """What issue 39 asks of the headline (every out-of-domain text after post-training) without reading e-mail and
    the manual one-shot, which nothing reports."""
    import torch

    from darwinlm.core.data.prepared import PreparedData
    from darwinlm.core.data.windows import windows_of_stream
    from darwinlm.core.evaluation.held_out import dense_eval_teacher
    from tests.support.tiny_models import tiny_model

    empty = torch.zeros(0, 16, dtype=torch.long)
    stream = torch.randint(0, 90, (64,), generator=torch.Generator().manual_seed(0))
    data = PreparedData(split=None, calibration_ids=empty, teacher_pool_ids=empty, train_ids=empty,
                        post_train_ids=empty, held_out={name: windows_of_stream(stream, 16, 2)
                                                        for name in ["sotu", *headline.OOD_TEXTS]})
    model = tiny_model("llama").eval()
    target = headline.Target.__new__(headline.Target)  # its measurement alone, without a database or a search
    target.data, target.eval_teacher = data, dense_eval_teacher(model, data, 8)
    target.one_shot_data = headline.one_shot_view(data)
    texts = lambda row: {key.removeprefix("ppl_").split("_posttrained")[0] for key in row if not key.endswith("_se")}
    assert texts(target.evaluate(model)) == {"sotu", "moby"}
    assert texts(target.evaluate(model, "_posttrained", every_text=True)) == {"sotu", "moby", "email", "npm_docs"}
    assert all(key.endswith(("_posttrained", "_posttrained_se")) for key in target.evaluate(model, "_posttrained"))


def test_the_out_of_domain_texts_are_the_default_split_s():
    from darwinlm.core.data.default_corpus import EVALUATION_LABELS, IN_DOMAIN_SET

    assert headline.OOD_TEXTS == ["moby", "email", "npm_docs"] and IN_DOMAIN_SET == "sotu"  # moby first
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
    target.llama_cpp_unsupported = "not measured in this test"
    target.evaluate = lambda model, suffix="", every_text=False: {  # e-mail stands for the texts read post-trained
        f"ppl_{text}{suffix}{se}": 10.0 for text in ["sotu", *(["email"] if every_text else [])] for se in ("", "_se")}
    row = target.peer_row("ziplm_dp")
    assert calls["method"] == "ziplm_dp" and calls["options"] == {"database": "the database"}
    assert calls["kept_fraction"] == pytest.approx(0.7) and calls["rows"] is target.data.calibration_ids
    assert calls["post_rows"] is target.data.post_train_ids and calls["teacher"] == "the teacher"
    assert calls["schedule"] == target.config.post_train.finetune
    assert set(row) == {"params_kept", "wall_s", "post_train_s", "ppl_sotu", "ppl_sotu_se", "ppl_sotu_posttrained",
                        "ppl_sotu_posttrained_se", "ppl_email_posttrained", "ppl_email_posttrained_se",
                        "llamacpp_unsupported"}
    assert (row["params_kept"], row["wall_s"]) == (50, 1.5)
    target.peer_row("flap")
    assert calls["options"] == {}


@pytest.fixture(scope="module")
def llama_cpp_target(tmp_path_factory):
    """A stand-in Target of a tiny llama (GQA, byte-level BPE vocabulary): its dense GGUFs by darwinlm's writer."""
    import tempfile

    from darwinlm.core.export.gguf import export_gguf
    from tests.support.tiny_models import TINY_BPE_VOCAB, random_token_rows, tiny_bpe_tokenizer, tiny_model

    def model():
        return tiny_model("llama", vocab_size=TINY_BPE_VOCAB, num_hidden_layers=4, hidden_size=96,
                          num_attention_heads=6, num_key_value_heads=2, intermediate_size=128, head_dim=16).eval()

    target = headline.Target.__new__(headline.Target)
    target.tokenizer, target.llama_cpp_unsupported = tiny_bpe_tokenizer(), None
    target.data = type("Data", (), {"calibration_ids": random_token_rows(TINY_BPE_VOCAB, 20, 32, seed=3)})()
    target.scratch = tempfile.TemporaryDirectory(dir=tmp_path_factory.mktemp("gguf"))
    target.dense_gguf = {}
    for quant in headline.LLAMA_CPP_QUANTS:
        target.dense_gguf[quant] = Path(target.scratch.name) / f"dense-{quant}.gguf"
        export_gguf(model(), target.tokenizer, str(target.dense_gguf[quant]), quant=quant)
    return target, model


@pytest.mark.parametrize("name", ["slimgpt", "shortgpt", "wanda_sp", "flap"])
def test_a_row_carries_its_llama_cpp_speed_or_says_why_not(llama_cpp_target, name):
    """Issue 38's keys on every row: the pruned model's prefill and decode speed over dense in llama.cpp, timed in
    the same rounds; a model llama.cpp cannot run (FLAP's output bias) says so in one line instead."""
    from bench.peers import prune_with

    target, model = llama_cpp_target
    pruned = model()
    prune_with(name, pruned, target.data.calibration_ids, 0.5)
    figures = target.llama_cpp_speedups(pruned)
    if name == "flap":
        assert set(figures) == {"llamacpp_unsupported"} and "bias" in figures["llamacpp_unsupported"]
        return
    assert set(figures) == {"llamacpp_prefill_speedup_f16", "llamacpp_decode_speedup_f16",
                            "llamacpp_prefill_speedup_q8_0"}
    assert all(value > 0 for value in figures.values())
    assert sorted(Path(target.scratch.name).iterdir()) == sorted(target.dense_gguf.values())  # the row's are gone


def test_without_a_dense_conversion_every_row_says_why(llama_cpp_target):
    target, model = llama_cpp_target
    stand_in = headline.Target.__new__(headline.Target)
    stand_in.llama_cpp_unsupported = "dense: llama.cpp's converter failed on gemma at f16: no sentencepiece"
    assert stand_in.llama_cpp_speedups(model()) == {"llamacpp_unsupported": stand_in.llama_cpp_unsupported}
