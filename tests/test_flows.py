"""The compress flow end to end on a tiny model through Prefect, with MLflow lineage, resume and re-runs."""

import json
import random
from pathlib import Path

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
    import mlflow.artifacts

    registered = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{summary['registered_model']}@current",
                                                     dst_path=str(workspace / "from-registry"))
    from_registry = AutoModelForCausalLM.from_pretrained(registered)  # the registry's copy loads and runs
    assert sum(p.numel() for p in from_registry.parameters()) == summary["evaluation"]["pruned"]["params"]
    metadata = json.loads((workspace / "store").joinpath(
        summary["model_uri"].split("store/")[1], "darwinlm.json").read_text())
    assert metadata["database"] == summary["database"]["digest"]


def test_rerun_of_a_finished_compression_does_no_work(workspace, monkeypatch):
    from flows.compress import compress
    import tasks.stages as stages

    first = compress(parameters(workspace))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("DatabaseBuilder", "Search", "post_train", "evaluate", "export_model"):
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
    monkeypatch.setattr(stages, "DatabaseBuilder", lambda *a, **k: pytest.fail("the database was rebuilt"))
    summary = compress(parameters(workspace))
    assert AutoModelForCausalLM.from_pretrained(summary["model_uri"]) is not None


KILLED_FLOW = """
import json, os, signal, sys
from darwinlm_core.search import Search

real_select = Search.select

def select(self, generation, stage_index, candidates):
    if (generation, stage_index) == (1, 1):  # mid-search: generation 0 saved, generation 1 half done
        os.kill(os.getpid(), signal.SIGKILL)
    return real_select(self, generation, stage_index, candidates)

Search.select = select
from flows.compress import CompressParameters, compress
compress(CompressParameters(**json.loads(sys.argv[1])))
"""


def test_killed_search_resumes_to_the_uninterrupted_result(workspace, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from darwinlm_core.search import Search
    from flows.compress import compress
    import tasks.stages as stages

    killed = parameters(workspace)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    process = subprocess.run([sys.executable, "-c", KILLED_FLOW, killed.model_dump_json()], env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    [run_root] = (workspace / "store" / "runs").iterdir()
    assert json.loads((run_root / "search_state.json").read_text())["generation"] == 1
    assert not (run_root / "genome.json").exists()

    stages_run = []
    real_select = Search.select
    with monkeypatch.context() as patch:  # the workspace's environment stays
        patch.setattr(Search, "select", lambda self, g, i, c: stages_run.append((g, i)) or real_select(self, g, i, c))
        patch.setattr(stages, "DatabaseBuilder", lambda *a, **k: pytest.fail("the finished database was rebuilt"))
        resumed = compress(killed)
    assert stages_run == [(1, 0), (1, 1)]  # generation 0 is not run again

    uninterrupted = compress(killed.model_copy(update={"store": str(workspace / "store-uninterrupted")}))
    genome = lambda summary: json.loads((Path(summary["run_uri"]) / "genome.json").read_text())  # noqa: E731
    assert genome(resumed)["attn"] == genome(uninterrupted)["attn"]
    assert genome(resumed)["mlp"] == genome(uninterrupted)["mlp"]
    assert genome(resumed)["fitness"] == pytest.approx(genome(uninterrupted)["fitness"], rel=1e-5)


def test_nightly_compresses_each_registered_checkpoint_once(workspace, monkeypatch):
    """An MLflow registered model as the checkpoint source: a new version is compressed once, then skipped."""
    from flows.nightly import nightly
    import tasks.stages as stages
    from tasks.tracking import Tracker

    tracker = Tracker()
    run = tracker.start("base checkpoint")
    tracker.client.log_artifacts(run, str(workspace / "model"), "checkpoint")
    tracker.client.create_registered_model("tiny-base")
    tracker.client.create_model_version("tiny-base", f"{tracker.client.get_run(run).info.artifact_uri}/checkpoint",
                                        run_id=run)
    arguments = dict(location="models:/tiny-base", preset="tiny", text=str(workspace / "corpus"),
                     store=str(workspace / "store"))
    [summary] = nightly(**arguments)
    assert AutoModelForCausalLM.from_pretrained(summary["model_uri"]) is not None
    assert summary["registered_model"].endswith("-pruned")

    with monkeypatch.context() as patch:
        patch.setattr(stages, "DatabaseBuilder", lambda *a, **k: pytest.fail("compressed twice"))
        patch.setattr(stages, "Search", lambda *a, **k: pytest.fail("compressed twice"))
        assert nightly(**arguments) == []

    with pytest.raises(Exception, match="no registered model 'nope'"):
        nightly(**dict(arguments, location="models:/nope"))


def test_compress_with_an_s3_store(workspace, s3_endpoint):
    """Every artifact of a compression on s3:// (a moto server): database, search state, export, markers."""
    import fsspec

    from flows.compress import compress
    from tasks.stages import _local_model_dir

    summary = compress(parameters(workspace).model_copy(update={"store": "s3://darwinlm/store"}))
    assert summary["model_uri"].startswith("s3://darwinlm/store/runs/")
    fs = fsspec.filesystem("s3")
    run = summary["run_uri"].removeprefix("s3://")
    for name in ("data.json", "search_state.json", "genome.json", "model/config.json", "evaluation.json",
                 "registered.json"):
        assert fs.exists(f"{run}/{name}"), name
    assert fs.exists(summary["database"]["uri"].removeprefix("s3://") + "/manifest.json")
    pruned = AutoModelForCausalLM.from_pretrained(_local_model_dir(summary["model_uri"]))
    assert sum(p.numel() for p in pruned.parameters()) == summary["evaluation"]["pruned"]["params"]
    assert not (workspace / "store").exists()  # nothing went to local disk instead
