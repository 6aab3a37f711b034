"""The compress flow end to end on a tiny model through Prefect, with MLflow lineage, resume and re-runs."""

import json
import random

import pytest
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM

from darwinlm_core.tiny_models import tiny_model, tiny_tokenizer

WORDS = "the state of the union is strong and people will work together for the nation future economy peace".split()


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def workspace(tmp_path, monkeypatch, prefect_server):
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for index in range(60):
        text = " ".join(rng.choice(WORDS) for _ in range(300))
        (tmp_path / "corpus" / f"doc_{index:02d}.txt").write_text(text + ".")
    return tmp_path


def parameters(workspace):
    from flows.compress import CompressParameters

    return CompressParameters(preset="tiny", model=str(workspace / "model"), text=str(workspace / "corpus"),
                              store=str(workspace / "store"))


def test_compress_runs_end_to_end_and_registers_lineage(workspace):
    from flows.compress import compress

    summary = compress(parameters(workspace))
    assert summary["kept_params"] <= 0.5 * summary["dense_params"]
    pruned = AutoModelForCausalLM.from_pretrained(summary["model_uri"])
    assert sum(p.numel() for p in pruned.parameters()) == summary["evaluation"]["pruned"]["params"]
    assert summary["evaluation"]["pruned"]["params"] < summary["evaluation"]["dense"]["params"]
    assert summary["evaluation"]["pruned"]["kl"] > 0 == summary["evaluation"]["dense"]["kl"] * 0

    client = MlflowClient()
    version = client.get_model_version_by_alias(summary["registered_model"], "current")
    for tag in ("base_model_digest", "database_digest", "split_digest", "search_run", "config_digest"):
        assert version.tags[tag]
    search_run = client.get_run(version.tags["search_run"])
    assert search_run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    history = client.get_metric_history(search_run.info.run_id, "best_fitness")
    assert len(history) == 2  # one point per generation of the tiny preset
    artifacts = {a.path for a in client.list_artifacts(search_run.info.run_id)}
    assert {"kept_per_layer.png", "fitness_curve.png"} <= artifacts
    metadata = json.loads((workspace / "store").joinpath(
        summary["model_uri"].split("store/")[1], "darwinlm.json").read_text())
    assert metadata["database"] == summary["database"]["digest"]


def test_rerun_of_a_finished_compression_does_no_work(workspace, monkeypatch):
    from flows.compress import compress
    import tasks.stages as stages

    first = compress(parameters(workspace))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("build_database", "Search", "post_train", "evaluate", "export_model"):
        monkeypatch.setattr(stages, name, forbidden)
    second = compress(parameters(workspace))
    assert second["model_uri"] == first["model_uri"] and second["registered_version"] == first["registered_version"]


def test_crashed_compression_resumes_without_redoing_finished_stages(workspace, monkeypatch):
    from flows.compress import compress
    import tasks.stages as stages

    real_export = stages.export_model
    monkeypatch.setattr(stages, "export_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk gone")))
    with pytest.raises(RuntimeError, match="disk gone"):
        compress(parameters(workspace))
    assert not list((workspace / "store" / "runs").glob("*/model/config.json"))  # nothing half-published

    monkeypatch.setattr(stages, "export_model", real_export)
    monkeypatch.setattr(stages, "Search", lambda *a, **k: pytest.fail("the finished search ran again"))
    monkeypatch.setattr(stages, "build_database", lambda *a, **k: pytest.fail("the database was rebuilt"))
    summary = compress(parameters(workspace))
    assert AutoModelForCausalLM.from_pretrained(summary["model_uri"]) is not None
