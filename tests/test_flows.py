"""The compress flow end to end on a tiny model through Prefect, with MLflow lineage, resume and re-runs."""

import json
import math
import os
import signal
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from darwinlm.core.evaluation.metrics import greedy_continuation
from darwinlm.core.export import huggingface as huggingface_export
from darwinlm.tasks.stages import SAMPLE_PROMPT_TOKENS
from tests.support import crash_campaign as campaign

pytestmark = pytest.mark.integration  # every test here runs whole compressions


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def workspace(tmp_path, monkeypatch, prefect_server):
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return campaign.make_workspace(tmp_path)


def parameters(workspace):
    from darwinlm.flows.compress import CompressParameters

    return CompressParameters(**campaign.parameters(workspace))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prefect_server):
    """The fingerprint (genome, exported weights) of a compression nobody killed."""
    from darwinlm.flows.compress import compress

    root = campaign.make_workspace(tmp_path_factory.mktemp("uninterrupted"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DARWINLM_HOME", str(root / "home"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        return campaign.fingerprint(compress(parameters(root))["run_uri"])


def test_compress_runs_end_to_end_and_registers_lineage(workspace):
    from darwinlm.flows.compress import compress

    started = datetime.now(timezone.utc)
    summary = compress(parameters(workspace))
    assert summary["kept_params"] <= 0.5 * summary["dense_params"]
    pruned = AutoModelForCausalLM.from_pretrained(summary["model_uri"])
    assert sum(p.numel() for p in pruned.parameters()) == summary["evaluation"]["pruned"]["params"]
    assert summary["evaluation"]["pruned"]["params"] < summary["evaluation"]["dense"]["params"]
    assert summary["evaluation"]["pruned"]["kl"] > 0
    assert summary["evaluation"]["dense"]["kl"] == pytest.approx(0.0, abs=1e-5)
    for row in (summary["evaluation"]["dense"], summary["evaluation"]["pruned"]):  # over the eval windows
        assert 0 < row["ppl_in_domain_se"] < row["ppl_in_domain"]  # a user's text: one set, held out of it
    assert summary["evaluation"]["in_domain"] == "in_domain"
    assert summary["evaluation"]["labels"] == summary["evaluation_labels"] == {"in_domain": "held-out corpus"}
    card = (Path(summary["model_uri"]) / "README.md").read_text()
    assert "| perplexity, held-out corpus (in domain) |" in card  # labelled by the split, as the table is
    # the greedy sample is each model's own continuation of the held-out prompt: regenerate both and compare
    sample = summary["evaluation"]["sample"]
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    # the tiny tokenizer is one character per token and decodes them space-joined: every other character
    prompt = tokenizer(sample["prompt"][::2], return_tensors="pt").input_ids[0]
    assert prompt.numel() == SAMPLE_PROMPT_TOKENS
    dense = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()
    assert sample["dense"] == greedy_continuation(dense, tokenizer, prompt)
    assert sample["pruned"] == greedy_continuation(pruned.eval(), tokenizer, prompt)

    client = MlflowClient()
    assert summary["alias"]["alias"] == "current-50" and summary["alias"]["alias_moved"]  # the first candidate
    version = client.get_model_version_by_alias(summary["registered_model"], "current-50")
    for tag in ("base_model_digest", "database_digest", "split_digest", "search_run", "config_digest",
                "held_out_ppl", "held_out_windows", "fraction_removed", "preset", "generations", "seed"):
        assert version.tags[tag]
    assert version.tags["role"] == "candidate"
    _assert_child_runs_carry_their_work(client, summary, version)
    search_run = client.get_run(version.tags["search_run"])
    assert search_run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    # MLflow shows what the search recorded, generation by generation, at the right step: compare with its state
    state = json.loads((Path(summary["run_uri"]) / "search_state.json").read_text())
    history = state["history"]
    assert [record["generation"] for record in history] == [0, 1]  # the tiny preset's two generations

    def logged(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(search_run.info.run_id, key),
                                                  key=lambda m: m.step)]

    # the trajectory: the start's KL on the fixed rows at step 0, then the parent's after each generation
    assert logged("fixed_kl") == [(0, pytest.approx(history[0]["previous_fixed_kl"], rel=1e-9))] + [
        (record["generation"] + 1, pytest.approx(record["fixed_kl"], rel=1e-9)) for record in history]
    assert history[1]["previous_fixed_kl"] == history[0]["fixed_kl"]  # each generation starts from the last parent
    for record in history:
        if not record["accepted"]:  # a parent kept is the same genome on the same fixed rows: its KL cannot move
            assert record["fixed_kl"] == pytest.approx(record["previous_fixed_kl"], rel=1e-6)
    for key in ("best_fitness", "acceptance_rate", "move_size", "kept"):
        assert logged(key) == [(record["generation"] + 1, pytest.approx(record[key], rel=1e-9))
                               for record in history], key
    assert logged("accepted") == [(record["generation"] + 1, float(record["accepted"])) for record in history]
    for stage in (0, 1):
        for figure in ("best", "median"):
            assert logged(f"stage{stage}_{figure}") == [
                (record["generation"] + 1, pytest.approx(record["stages"][stage][figure], rel=1e-9))
                for record in history]
    # paired z only where a challenger beat the parent (there was a decision to measure) and it is finite (tiny
    # rows can differ by exactly the same amount: z = ±inf, which a plot cannot show)
    assert logged("paired_z") == [(record["generation"] + 1, pytest.approx(record["paired_z"], rel=1e-9))
                                  for record in history
                                  if record["paired_z"] is not None and math.isfinite(record["paired_z"])]
    assert search_run.data.tags["start"] == state["start"].get("chosen", "uniform")
    _assert_start_and_generations_in_prefect(started, state)
    artifacts = {a.path for a in client.list_artifacts(search_run.info.run_id)}
    assert {"kept_per_layer.png", "fitness_curve.png"} <= artifacts
    compress_run = client.get_run(summary["mlflow_run_id"])
    assert compress_run.data.params["search.offspring"] == "4" and "data.seed" in compress_run.data.params
    assert {"config.yaml", "greedy_sample.json"} <= {a.path for a in client.list_artifacts(compress_run.info.run_id)}
    assert "block parameters kept" in version.description
    _assert_prefect_artifacts(summary)
    import mlflow.artifacts

    registered = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{summary['registered_model']}@current-50", dst_path=str(workspace / "from-registry"))
    import yaml

    # an MLflow model (its loading: tests/test_registry.py), holding the export, which loads and runs
    flavour = yaml.safe_load((Path(registered) / "MLmodel").read_text())["flavors"]["python_function"]
    from_registry = AutoModelForCausalLM.from_pretrained(Path(registered) / flavour["artifacts"]["hf_model"]["path"])
    assert sum(p.numel() for p in from_registry.parameters()) == summary["evaluation"]["pruned"]["params"]
    metadata = json.loads((workspace / "store").joinpath(
        summary["model_uri"].split("store/")[1], "darwinlm.json").read_text())
    assert metadata["database"] == summary["database"]["digest"]
    assert metadata["refit"] is True and (Path(summary["run_uri"]) / "refit.safetensors").is_file()
    assert json.loads((Path(summary["run_uri"]) / "refit.json").read_text())["error_after"] >= 0


def _assert_start_and_generations_in_prefect(since: datetime, state: dict) -> None:
    """The start choice is its own task run, whose log line gives both KLs, and generations are numbered
    from 1 in task names as in the logs, MLflow steps and the progress artifact (the start being 0)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterStartTime, LogFilter, LogFilterTaskRunId,
                                                TaskRunFilter, TaskRunFilterStartTime)

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)),
                                     limit=200)
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        [start_run] = [run for run in runs if run.name == "choose-start"]
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[start_run.id])))
    start = state["start"]
    assert start["chosen"] in ("informed", "uniform") and start["fixed_kl"] == min(start["informed_kl"],
                                                                                   start["uniform_kl"])
    [line] = [log.message for log in logs if log.message.startswith("search start:")]
    assert f"{start['informed_kl']:.4f} (informed start)" in line and f"{start['uniform_kl']:.4f} (uniform)" in line
    # the search subflow says what it searches, as the compress run does (not a random Prefect name)
    assert {run.name for run in flows} >= {"search · −50% · 2 generations · seed 0"}
    names = {run.name for run in runs}
    assert {"generation-1", "generation-2", "select-g1-s0", "select-g2-s1"} <= names  # the tiny preset: 2 × 2
    assert not {"generation-0", "select-g0-s0", "generation-3"} & names


def _assert_child_runs_carry_their_work(client, summary: dict, version) -> None:
    """Every run of the compression names its code, version, text and device; each stage's run holds what that
    stage did, and the digests that link it to the others."""
    from darwinlm.core import __version__

    parent = client.get_run(summary["mlflow_run_id"])
    children = {run.info.run_name: run for run in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) >= {"database", "search", "refit", "post_train", "evaluate", "register"}
    for run in (parent, *children.values()):
        tags = run.data.tags
        assert tags["darwinlm_version"] == __version__ and tags["git_commit"] and tags["device"] in ("cpu", "cuda")
        assert tags["split_digest"] == version.tags["split_digest"]
    assert parent.data.params["device"] in ("cpu", "cuda") and parent.data.params["data.text"] != "None"
    title = parent.info.run_name  # what tells it from its neighbours: preset, fraction, generations, seed
    assert Path(version.tags["preset"]).stem in title and "−50%" in title
    assert f"{version.tags['generations']} generations" in title and f"seed {version.tags['seed']}" in title
    database = children["database"]
    assert database.data.tags["database_digest"] == summary["database"]["digest"]
    assert database.data.metrics["levels"] > 0 and "wall_s" in database.data.metrics
    assert {"error_before", "error_after"} <= set(children["refit"].data.metrics)
    losses = client.get_metric_history(children["post_train"].info.run_id, "loss")
    assert len(losses) > 1 and children["post_train"].data.tags["database_digest"] == summary["database"]["digest"]
    assert children["evaluate"].data.metrics["pruned_kl"] == pytest.approx(summary["evaluation"]["pruned"]["kl"])
    assert children["register"].data.tags["registered_version"] == str(summary["registered_version"])


def assert_loads_as_evaluated(summary: dict) -> None:
    """The exported model loads, has the parameter count its evaluation reports, and runs."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(summary["model_uri"])
    assert sum(p.numel() for p in model.parameters()) == summary["evaluation"]["pruned"]["params"]
    assert summary["evaluation"]["pruned"]["params"] < summary["evaluation"]["dense"]["params"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_rerun_of_a_finished_compression_does_no_work(workspace, monkeypatch):
    from darwinlm.flows.compress import compress
    import darwinlm.tasks.stages as stages

    first = compress(parameters(workspace))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("DatabaseBuilder", "build_search", "refit_weights", "post_train", "evaluate"):
        monkeypatch.setattr(stages, name, forbidden)
    monkeypatch.setattr(huggingface_export, "export_model", forbidden)  # the export task imports it when it runs
    second = compress(parameters(workspace))
    assert second["model_uri"] == first["model_uri"] and second["registered_version"] == first["registered_version"]


def test_runs_of_one_model_and_text_share_the_dense_models_teachers_and_evaluation(workspace, monkeypatch):
    """Another search seed is another run over the same dense model and rows: its teachers, the rows of text the
    dense model wrote for selection, and the dense model's evaluation are read from the store, not computed
    again, and its dense row is the first run's."""
    from darwinlm.flows.compress import compress
    import darwinlm.tasks.stages as stages

    first = compress(parameters(workspace))
    generated = list((workspace / "store" / "generated").glob("*.safetensors"))
    assert len(generated) == 1  # the tiny preset mixes 2 generated rows into its 4 selection rows
    monkeypatch.setattr(stages, "compute_teacher", lambda *a, **k: pytest.fail("a teacher was computed again"))
    monkeypatch.setattr(stages, "generated_rows", lambda *a, **k: pytest.fail("rows were generated again"))
    monkeypatch.setattr(stages, "evaluate_dense", lambda *a, **k: pytest.fail("the dense model was evaluated again"))
    second = compress(parameters(workspace).model_copy(update={"seed": 1}))
    assert second["run_uri"] != first["run_uri"]
    measured_again = ("prefill_tokens_per_s",)  # a speed ratio needs both models timed in the same run
    dense_rows = [{key: value for key, value in run["evaluation"]["dense"].items() if key not in measured_again}
                  for run in (first, second)]
    assert dense_rows[0] == dense_rows[1] and "ppl_in_domain" in dense_rows[0]
    assert second["evaluation"]["pruned"]["kl"] > 0  # the pruned model is still measured, against the stored teacher
    assert campaign.artifact_problems(workspace / "store") == []
    assert list((workspace / "store" / "generated").glob("*")) == generated


def test_crashed_compression_resumes_without_redoing_finished_stages(workspace, monkeypatch):
    from darwinlm.flows.compress import compress
    import darwinlm.tasks.stages as stages

    real_export = huggingface_export.export_model
    monkeypatch.setattr(huggingface_export, "export_model",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk gone")))
    with pytest.raises(RuntimeError, match="disk gone"):
        compress(parameters(workspace))
    assert not list((workspace / "store" / "runs").glob("*/model/config.json"))  # nothing half-published

    monkeypatch.setattr(huggingface_export, "export_model", real_export)
    monkeypatch.setattr(stages, "build_search", lambda *a, **k: pytest.fail("the finished search ran again"))
    monkeypatch.setattr(stages, "refit_weights", lambda *a, **k: pytest.fail("the finished refit ran again"))
    monkeypatch.setattr(stages, "DatabaseBuilder", lambda *a, **k: pytest.fail("the database was rebuilt"))
    summary = compress(parameters(workspace))
    assert_loads_as_evaluated(summary)


@pytest.mark.parametrize("kill_point", sorted(campaign.KILL_POINTS))
def test_killed_compression_resumes_to_the_uninterrupted_result(workspace, kill_point, uninterrupted, monkeypatch):
    """kill -9 during the database build, mid-search, mid-export, or between registering and its marker; the
    re-run redoes no finished stage, leaves nothing half-written, registers once, and ends where an
    uninterrupted run does."""
    from prefect.settings import PREFECT_API_URL

    from darwinlm.core.search.evolution import Search
    from darwinlm.flows.compress import compress

    env = campaign.child_env(workspace, PREFECT_API_URL.value())
    code, _, _ = campaign.run_child(campaign.parameters(workspace), env, kill_point=kill_point)
    assert code == -signal.SIGKILL
    before = campaign.stage_markers(workspace / "store")
    state_file = next((workspace / "store").glob("runs/*/search_state.json"), None)
    saved_generation = json.loads(state_file.read_text())["generation"] if state_file else 0

    generations_run = []
    real_select = Search.select
    with monkeypatch.context() as patch:
        patch.setattr(Search, "select", lambda self, g, i, c: generations_run.append(g) or real_select(self, g, i, c))
        summary = compress(parameters(workspace))
    assert campaign.rerun_stages(before, campaign.stage_markers(workspace / "store")) == []
    assert all(generation >= saved_generation for generation in generations_run)
    assert campaign.artifact_problems(workspace / "store") == []
    assert campaign.fingerprint(summary["run_uri"]) == uninterrupted
    assert campaign.registered_versions(os.environ["MLFLOW_TRACKING_URI"], summary["registered_model"]) == 1


def test_nightly_compresses_each_registered_checkpoint_once(workspace, monkeypatch):
    """An MLflow registered model as the checkpoint source: a new version is compressed once, then skipped."""
    from darwinlm.flows.nightly import nightly
    import darwinlm.tasks.stages as stages
    from darwinlm.tasks.tracking import Tracker

    tracker = Tracker()
    run = tracker.start("base checkpoint")
    tracker.client.log_artifacts(run, str(workspace / "model"), "checkpoint")
    tracker.client.create_registered_model("tiny-base")
    tracker.client.create_model_version("tiny-base", f"{tracker.client.get_run(run).info.artifact_uri}/checkpoint",
                                        run_id=run)
    arguments = dict(location="models:/tiny-base", preset="tiny", text=str(workspace / "corpus"),
                     store=str(workspace / "store"))
    [summary] = nightly(**arguments)
    assert_loads_as_evaluated(summary)
    assert summary["registered_model"].endswith("-pruned")

    with monkeypatch.context() as patch:
        patch.setattr(stages, "DatabaseBuilder", lambda *a, **k: pytest.fail("compressed twice"))
        patch.setattr(stages, "Search", lambda *a, **k: pytest.fail("compressed twice"))
        assert nightly(**arguments) == []

    with pytest.raises(Exception, match="no registered model 'nope'"):
        nightly(**dict(arguments, location="models:/nope"))


def test_compress_with_an_s3_store(workspace, s3_endpoint, tmp_path, monkeypatch):
    """Every artifact of a compression on s3:// (a moto server): database, search state, export, markers; and no
    copy of the model left behind in the temporary folder by the stages that read it back."""
    import tempfile

    import fsspec

    from darwinlm.flows.compress import compress
    from darwinlm.core.uri_io import local_view

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    summary = compress(parameters(workspace).model_copy(update={"store": "s3://darwinlm/store"}))
    assert not [path.name for path in temporary.iterdir() if path.name.startswith("darwinlm-download-")]
    assert summary["model_uri"].startswith("s3://darwinlm/store/runs/")
    fs = fsspec.filesystem("s3")
    run = summary["run_uri"].removeprefix("s3://")
    for name in ("data.json", "search_state.json", "genome.json", "model/config.json", "evaluation.json",
                 "registered.json"):
        assert fs.exists(f"{run}/{name}"), name
    assert fs.exists(summary["database"]["uri"].removeprefix("s3://") + "/manifest.json")
    # the shared dense-model work too: teachers of the search pool, the selection pool and post-training, and the
    # rows the dense model wrote for selection
    assert len(fs.glob("darwinlm/store/teachers/*.safetensors")) == 3
    assert len(fs.glob("darwinlm/store/generated/*.safetensors")) == 1
    assert len(fs.glob("darwinlm/store/dense-evaluations/*/evaluation.json")) == 1
    with local_view(summary["model_uri"]) as folder:
        pruned = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in pruned.parameters()) == summary["evaluation"]["pruned"]["params"]
    assert not (workspace / "store").exists()  # nothing went to local disk instead


def test_concurrent_compressions_share_work_and_do_not_interfere(workspace, uninterrupted):
    """Two compressions of the same checkpoint started together: one does the work, the other waits and finds
    it done, and both end with the uninterrupted result. A different one alongside is unaffected."""
    from prefect.settings import PREFECT_API_URL

    env = campaign.child_env(workspace, PREFECT_API_URL.value())
    same = campaign.parameters(workspace)
    processes = [campaign.start_child(same, env) for _ in range(2)]
    results = [campaign.finish_child(process) for process in processes]
    assert [code for code, _, _ in results] == [0, 0]
    assert results[0][1] == results[1][1]  # same run, same model, same registered name
    assert sum(work["layers"] for _, _, work in results) == 3  # the tiny model's layers, pruned once in all
    assert campaign.fingerprint(results[0][1]["run_uri"]) == uninterrupted
    assert campaign.registered_versions(os.environ["MLFLOW_TRACKING_URI"], results[0][1]["registered_model"]) == 1

    other = dict(same, store=str(workspace / "store-other"))
    different = campaign.start_child(dict(other, seed=7), env)
    again = campaign.start_child(dict(same, store=str(workspace / "store-again")), env)
    (code_a, summary_a, _), (code_b, summary_b, _) = campaign.finish_child(again), campaign.finish_child(different)
    assert code_a == code_b == 0 and summary_b["run_uri"] != summary_a["run_uri"]
    assert campaign.fingerprint(summary_a["run_uri"]) == uninterrupted
    assert campaign.artifact_problems(workspace / "store-other") == []


def test_deployments_run_through_a_worker(workspace):
    """README's server/worker path: create the pool, deploy prefect.yaml, trigger `compress` with a form's
    parameters, and let a worker (started as `darwinlm worker` does) run it to completion."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    repository = Path(__file__).resolve().parent.parent
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = dict(campaign.child_env(workspace, PREFECT_API_URL.value()), DARWINLM_REPO=str(repository),
               DARWINLM_CHECKPOINTS=str(workspace / "checkpoints"))

    def run(*arguments, timeout=300):
        done = subprocess.run([prefect, *arguments], env=env, cwd=repository, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    run("work-pool", "create", "darwinlm", "--type", "process")
    run("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    form = json.dumps({"parameters": campaign.parameters(workspace)})
    run("deployment", "run", "compress/compress", "--params", form)
    run("worker", "start", "--pool", "darwinlm", "--run-once", timeout=600)
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        runs = [r for r in client.read_flow_runs() if r.deployment_id == deployments["compress"].id]
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    assert len(list((workspace / "store").glob("runs/*/registered.json"))) == 1


def test_search_on_a_two_worker_dask_cluster_gives_the_serial_genome(workspace, uninterrupted):
    """Offspring evaluations fan out as Prefect tasks on a 2-worker LocalCluster bound to 127.0.0.1; each
    worker loads the model, database and stored teacher once; the result equals the serial run's."""
    from darwinlm.flows.compress import compress

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    summary = compress(parameters(workspace).model_copy(update={"dask_workers": 2}))
    assert campaign.fingerprint(summary["run_uri"]) == uninterrupted
    with get_client(sync_client=True) as client:
        candidates = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="candidate-g")), limit=200)
    # per generation 4 offspring, then 2 survivors + the parent, over the tiny preset's 2 generations
    assert len(candidates) == 2 * (4 + 3) and all(run.state.is_completed() for run in candidates)
    # the search pool, the selection pool (with the generated rows) and post-training, each made once
    assert len(list((workspace / "store" / "teachers").glob("*.safetensors"))) == 3


def test_zero_generations_exports_the_uniform_genome_without_a_search(workspace, monkeypatch):
    """Also the post-training path without the refit stage (on by default, as in the other flow tests)."""
    import yaml

    from darwinlm.core.config import PRESET_DIR
    from darwinlm.core.database.store import Database
    from darwinlm.core.search.genome import Budget
    from darwinlm.flows.compress import compress
    import darwinlm.tasks.stages as stages

    preset = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    preset["post_train"]["refit"] = False
    (workspace / "no-refit.yaml").write_text(yaml.safe_dump(preset))
    import darwinlm.core.compression as compression

    monkeypatch.setattr(stages, "Search", lambda *a, **k: pytest.fail("no generation needs a live search"))
    monkeypatch.setattr(compression, "refit_genome", lambda *a, **k: pytest.fail("the refit is turned off"))
    summary = compress(parameters(workspace).model_copy(update={
        "generations": 0, "start": "uniform", "preset_file": str(workspace / "no-refit.yaml")}))
    genome = json.loads((Path(summary["run_uri"]) / "genome.json").read_text())
    database = Database.open(summary["database"]["uri"])
    uniform = Budget.from_database(database, fraction_removed=0.5, seq_len=32).uniform()
    assert genome["attn"] == list(uniform[0::2]) and genome["mlp"] == list(uniform[1::2])
    assert not (Path(summary["run_uri"]) / "refit.json").exists()
    metadata = json.loads((workspace / "store").joinpath(
        summary["model_uri"].split("store/")[1], "darwinlm.json").read_text())
    assert metadata["refit"] is False
    # a baseline registers as one and leaves current-50 alone (here: to nobody)
    assert summary["alias"]["alias_moved"] is False and "baseline" in summary["alias"]["alias_decision"]
    version = MlflowClient().get_model_version(summary["registered_model"], summary["registered_version"])
    assert version.tags["role"] == "baseline" and not version.aliases
    _assert_prefect_artifacts(summary)  # its own artifacts, not the searched run's: "0 of 0 generations" no more
    import mlflow.pyfunc

    # the baseline's version is an MLflow model too (loading it where darwinlm is absent: tests/test_registry.py)
    model = mlflow.pyfunc.load_model(f"models:/{summary['registered_model']}/{summary['registered_version']}")
    [text] = model.predict(["a b c"], params={"max_new_tokens": 3})
    assert text.startswith("a")


def _assert_prefect_artifacts(summary: dict) -> None:
    """The run's Artifacts tab: search progress at 100%, the summary table, and the MLflow links."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from darwinlm.flows.artifacts import artifact_key, run_prefix

    base = summary["registered_model"].removesuffix("-pruned")  # keyed by the base model's name and the run's digest
    prefix = run_prefix(base, summary["config_digest"])
    keys = [artifact_key(prefix, name) for name in ("search-progress", "compression-summary", "mlflow-run",
                                                  "registered-model")]
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {artifact.key: artifact for artifact in found}
    assert set(by_key) == set(keys)
    assert float(by_key[keys[0]].data) == pytest.approx(100.0)
    assert summary["mlflow_run_id"] in str(by_key[keys[2]].data)
    with get_client(sync_client=True) as client:  # the progress sits on the compress run, named as its MLflow run
        compress_run = client.read_flow_run(by_key[keys[0]].flow_run_id)
    assert "generations · seed" in compress_run.name
