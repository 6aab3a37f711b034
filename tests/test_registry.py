"""The model registry as an MLflow user meets it: `current-<percent>` moves only to a better candidate on the same
held-out windows, baselines and ablations never take it, `darwinlm promote` moves it by hand, and a registered
version is an MLflow model that loads and generates text in a process that never imported darwinlm."""

import json
import subprocess
import sys

import pytest

from darwinlm.core.errors import DarwinLMError
from darwinlm.tasks.registry import (BASELINE, CANDIDATE, DECISION_TAG, alias_for, decide_alias, held_out_figure,
                                     offer_alias, promote, role_of, version_tags, windows_digest)

NAME = "tiny-pruned"
WINDOWS = {"split": "validation", "protocol": "spread-v1", "sets": {"news": {"count": 4}}}


def evaluation(ppl: float, windows: dict = WINDOWS, test_ppl: float | None = None) -> dict:
    """An evaluation record as the evaluate stage writes it, with the pruned model's in-domain perplexity `ppl` on
    the validation windows and `test_ppl` (default: the same) on the test windows; the sets have neither default
    name on purpose."""
    test_ppl = ppl if test_ppl is None else test_ppl
    return {"dense": {"ppl_news": 20.0, "ppl_novel": 50.0}, "in_domain": "news",
            "windows": {"split": "test", "protocol": "spread-v1", "sets": {"news": {"count": 4}, "novel": {"count": 4}}},
            "pruned": {"ppl_news": test_ppl, "ppl_news_se": 1.0, "ppl_novel": 3 * test_ppl, "kl": 0.5},
            "validation": {"ppl_news": ppl, "ppl_news_se": 1.0, "windows": windows}}


def tags(ppl: float, generations: int = 4, windows: dict = WINDOWS, split: str = "split-a",
         test_ppl: float | None = None) -> dict:
    return version_tags(evaluation(ppl, windows, test_ppl), split, fraction_removed=0.5, preset="tiny",
                        generations=generations, seed=0, role=role_of(generations))


def test_the_in_domain_validation_figure_is_read_from_the_record_whatever_the_sets_are_called():
    assert held_out_figure(evaluation(55.0, test_ppl=70.0)) == ("news", 55.0)  # validation, not test
    no_name = {key: value for key, value in evaluation(55.0).items() if key != "in_domain"}
    assert held_out_figure(no_name) == ("news", 55.0)  # the first set: the split puts the in-domain set first
    assert alias_for(0.5) == "current-50" and alias_for(0.3) == "current-30"
    older = {key: value for key, value in evaluation(55.0).items() if key != "validation"}
    with pytest.raises(DarwinLMError, match="no validation-window perplexity.*evaluate it again"):
        held_out_figure(older)


def test_a_record_with_every_set_s_validation_figures_compares_with_an_in_domain_only_one():
    """Evaluations now record the out-of-domain sets' validation figures too: versions registered before keep
    their windows digest, so the alias still compares them, and the digest still tells other windows apart."""
    every_set = evaluation(55.0)
    every_set["validation"] = {**every_set["validation"], "ppl_novel": 150.0, "ppl_novel_se": 4.0,
                               "windows": {**WINDOWS, "sets": {**WINDOWS["sets"], "novel": {"count": 4}}}}
    assert held_out_figure(every_set) == ("news", 55.0)
    assert windows_digest(every_set, "split-a") == windows_digest(evaluation(60.0), "split-a")
    fewer = {**WINDOWS, "sets": {"news": {"count": 3}, "novel": {"count": 4}}}
    assert windows_digest({**every_set, "validation": {**every_set["validation"], "windows": fewer}},
                          "split-a") != windows_digest(every_set, "split-a")


def test_the_alias_policy():
    assert role_of(0) == BASELINE and role_of(4) == CANDIDATE and role_of(4, ablation=True) == "ablation"
    first = decide_alias("current-50", "1", tags(55.25), None, None)
    assert first.moved
    baseline = decide_alias("current-50", "2", tags(50.0, generations=0), "1", tags(55.25))
    assert not baseline.moved and "baseline" in baseline.reason
    assert not decide_alias("current-50", "3", tags(58.65), "1", tags(55.25)).moved
    assert decide_alias("current-50", "4", tags(54.0), "1", tags(55.25)).moved
    other_windows = decide_alias("current-50", "5", tags(40.0, windows={**WINDOWS, "protocol": "contiguous"}), "1",
                                 tags(55.25))
    assert not other_windows.moved and "not comparable" in other_windows.reason
    other_text = decide_alias("current-50", "6", tags(40.0, split="split-b"), "1", tags(55.25))
    assert not other_text.moved and "not comparable" in other_text.reason
    assert not decide_alias("current-50", "7", tags(40.0), "1", {}).moved  # a holder without figures
    # the reported test figures play no part: better on test, worse on validation, and the alias stays
    assert not decide_alias("current-50", "8", tags(56.0, test_ppl=30.0), "1", tags(55.25)).moved
    assert decide_alias("current-50", "9", tags(55.0, test_ppl=90.0), "1", tags(55.25)).moved


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny pruned model exported by darwinlm's exporter."""
    from darwinlm.core.export.huggingface import export_model
    from tests.support.tiny_models import pruned_tiny, tiny_tokenizer

    folder = tmp_path_factory.mktemp("export")
    model, _, _, _ = pruned_tiny("llama", folder)
    export_model(model, tiny_tokenizer(), str(folder / "out"))
    return str(folder / "out")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, exported):
    """A sqlite MLflow store holding: v1 a candidate (ppl 55.25), v2 a better baseline, v3 a worse candidate, v4 a
    better candidate, v5 a much better one measured on other windows, each offered current-50 in turn."""
    from darwinlm.tasks.tracking import Tracker

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="registry-test")
    decisions = {}
    for ppl, generations, windows in ((55.25, 4, WINDOWS), (50.0, 0, WINDOWS), (58.65, 4, WINDOWS),
                                      (54.0, 4, WINDOWS), (40.0, 4, {**WINDOWS, "protocol": "contiguous"})):
        run = tracker.start(f"compress ppl {ppl}")
        version = tracker.register(run, exported, NAME, tags(ppl, generations, windows), description=f"ppl {ppl}")
        decisions[version] = offer_alias(tracker.client, NAME, version, "current-50")
        tracker.finish(run)
    return uri, tracker.client, decisions


def test_only_better_candidates_on_the_same_windows_take_the_alias(registry):
    uri, client, decisions = registry
    assert [decisions[v].moved for v in "12345"] == [True, False, False, True, False]
    assert client.get_model_version_by_alias(NAME, "current-50").version == 4
    for version, decision in decisions.items():  # each version says why it holds the alias or not
        assert client.get_model_version(NAME, version).tags[DECISION_TAG] == decision.reason
    second = client.get_model_version(NAME, "2")
    assert second.tags["role"] == BASELINE and second.tags["generations"] == "0"
    assert {"fraction_removed", "preset", "seed", "held_out_ppl", "held_out_set"} <= set(second.tags)


def test_promote_moves_the_alias_by_hand_and_names_what_it_cannot_find(registry, monkeypatch, capsys):
    from darwinlm.flows import cli

    uri, client, _ = registry
    assert promote(client, NAME, "3").alias == "current-50"
    assert client.get_model_version_by_alias(NAME, "current-50").version == 3
    with pytest.raises(DarwinLMError, match="no registered model 'nope'"):
        promote(client, "nope", "1")
    with pytest.raises(DarwinLMError, match="has no version 9 .* its versions: 1, 2, 3, 4, 5"):
        promote(client, NAME, "9")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["promote", NAME, "4"]) == 0
    assert client.get_model_version_by_alias(NAME, "current-50").version == 4
    capsys.readouterr()
    assert cli.main(["promote", NAME, "x"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("darwinlm: error: version 'x'") and error.count("\n") == 1


# Loads the registered model as an MLflow user would, where darwinlm cannot be imported, and generates.
FRESH_PROCESS = """
import json, sys
sys.modules["darwinlm"] = None  # any import of darwinlm from here on raises ImportError
import mlflow.pyfunc
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/tiny-pruned@current-50")
texts = model.predict(["a b c"], params={"max_new_tokens": 5})
print(json.dumps({"texts": texts, "path": sys.path,
                  "darwinlm": sorted(name for name in sys.modules if name.startswith("darwinlm")
                                     and sys.modules[name] is not None)}))
"""


def test_the_registered_model_loads_and_generates_in_a_process_without_darwinlm(registry, tmp_path):
    from pathlib import Path

    uri, client, _ = registry
    repository = str(Path(__file__).resolve().parents[1])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, uri], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["darwinlm"] == [] and repository not in output["path"]
    [text] = output["texts"]
    prompt = "a   b   c"  # the tiny tokenizer decodes one character per token, space-joined
    assert text.startswith(prompt) and len(text) > len(prompt)
