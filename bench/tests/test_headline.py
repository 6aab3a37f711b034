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
    assert (args.targets, args.seeds, args.results) == ([0.3, 0.5], [0, 1, 2], "headline")
