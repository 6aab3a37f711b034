"""Kill a compression and check what the re-run does: shared by tests/test_flows.py (fixed kill points) and
bench/reliability.py (seeded random kill times).

A trial runs `compress` on the tiny preset in a child process, kills it with SIGKILL (at a named point, from a
hook inside the child, or after a delay, from outside), then runs it again to the end and checks:
  * stage markers (data.json, each database layer.json and manifest, genome.json, model/config.json,
    evaluation.json, registered.json) that existed before the re-run are not rewritten: no finished stage re-runs;
  * every artifact reads back whole (database shards hash-checked, JSON parses, the export loads);
  * the final genome and exported weights equal an uninterrupted run's.
"""

import hashlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "the state of the union is strong and people will work together for the nation future economy peace".split()

# Python run in the child before the flow: each hook SIGKILLs the process at one moment of the pipeline.
KILL_POINTS = {
    "database": """
from darwinlm.core.database.store import DatabaseBuilder
real = DatabaseBuilder.build_layer
def build_layer(self, layer):
    if layer == 1:  # layer 0 written, layer 1 not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, layer)
DatabaseBuilder.build_layer = build_layer
""",
    "search": """
from darwinlm.core.search.evolution import Search
real = Search.select
def select(self, generation, stage_index, candidates):
    if (generation, stage_index) == (1, 1):  # generation 0 saved, generation 1 half done
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, generation, stage_index, candidates)
Search.select = select
""",
    "export": """
from darwinlm.core import uri_io
real = uri_io.write_bytes
written = []
def write_bytes(uri, data):
    if "/model/" in uri:
        written.append(uri)
        if len(written) == 2:  # one file of the export published, the rest not
            os.kill(os.getpid(), signal.SIGKILL)
    return real(uri, data)
uri_io.write_bytes = write_bytes
""",
    "register": """
from darwinlm.tasks.tracking import Tracker
real = Tracker.register
def register(self, *args, **kwargs):
    real(self, *args, **kwargs)  # registered in MLflow, marker not yet written
    os.kill(os.getpid(), signal.SIGKILL)
Tracker.register = register
""",
}

# Counts the work a child really does (layers pruned, selection stages run), printed as WORK {...} at exit.
COUNT_WORK = """
import atexit
from darwinlm.core.database.store import DatabaseBuilder
from darwinlm.core.search.evolution import Search
work = {"layers": 0, "stages": 0}
real_build, real_select = DatabaseBuilder._build_layer, Search.select
def build(self, layer):
    work["layers"] += 1
    return real_build(self, layer)
def select(self, *args):
    work["stages"] += 1
    return real_select(self, *args)
DatabaseBuilder._build_layer, Search.select = build, select
atexit.register(lambda: print("WORK " + json.dumps(work), flush=True))
"""

CHILD = """
import json, os, signal, sys
{hook}
from darwinlm.flows.compress import CompressParameters, compress
summary = compress(CompressParameters(**json.loads(sys.argv[1])))
print("SUMMARY " + json.dumps({{k: summary[k] for k in ("run_uri", "model_uri", "registered_model")}}))
"""


def make_workspace(root: Path) -> Path:
    """A tiny llama checkpoint (with tokenizer) and a 60-document corpus under `root`; deterministic."""
    from tests.support.tiny_models import tiny_model, tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "corpus").mkdir(exist_ok=True)
    for index in range(60):
        text = " ".join(rng.choice(WORDS) for _ in range(300))
        (root / "corpus" / f"doc_{index:02d}.txt").write_text(text + ".")
    return root


def parameters(workspace: Path, store: str | None = None) -> dict:
    return {"preset": "tiny", "model": str(workspace / "model"), "text": str(workspace / "corpus"),
            "store": store or str(workspace / "store")}


def start_child(params: dict, env: dict, kill_point: str | None = None) -> subprocess.Popen:
    """Start compress in a child process that counts its work (and dies at `kill_point`, if given)."""
    code = CHILD.format(hook=COUNT_WORK + (KILL_POINTS[kill_point] if kill_point else ""))
    # output to files, not pipes: a child nobody reads from until it ends must never block on a full pipe
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], env=env, text=True,
                               stdout=out, stderr=err)
    process.output_files = (out, err)
    return process


def finish_child(process: subprocess.Popen, kill_after_s: float | None = None,
                 timeout_s: float = 600) -> tuple[int, dict | None, dict | None]:
    """(exit code, summary or None, work counts or None) of a child, killed after `kill_after_s` if given."""
    try:
        if kill_after_s is not None:
            try:
                process.wait(timeout=kill_after_s)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    out, err = (_read_and_close(file) for file in process.output_files)
    found = {}
    for line in out.splitlines():
        for key in ("SUMMARY", "WORK"):
            if line.startswith(key + " "):
                found[key] = json.loads(line.removeprefix(key + " "))
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"compress failed with {process.returncode}: {err[-3000:]}")
    return process.returncode, found.get("SUMMARY"), found.get("WORK")


def _read_and_close(file) -> str:
    file.seek(0)
    text = file.read()
    file.close()
    return text


def run_child(params: dict, env: dict, kill_point: str | None = None, kill_after_s: float | None = None,
              timeout_s: float = 600) -> tuple[int, dict | None, dict | None]:
    """Run compress in a child process to its end (or its kill); see finish_child."""
    return finish_child(start_child(params, env, kill_point), kill_after_s, timeout_s)


MARKER_NAMES = ("data.json", "layer.json", "manifest.json", "genome.json", "evaluation.json", "registered.json")


def stage_markers(store: Path) -> dict[str, int]:
    """{path: mtime_ns} of every file whose existence says a stage (or database layer) finished."""
    found = {}
    for path in store.rglob("*"):
        if path.is_file() and (path.name in MARKER_NAMES or (path.name == "config.json" and path.parent.name == "model")):
            found[str(path.relative_to(store))] = path.stat().st_mtime_ns
    return found


def rerun_stages(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(path for path, mtime in before.items() if after.get(path) != mtime)


def artifact_problems(store: Path) -> list[str]:
    """Artifacts that do not read back whole, and temporaries a killed write left behind."""
    from darwinlm.core.database.store import Database

    problems = [f"stale temporary {p.relative_to(store)}" for p in store.rglob("*.tmp-*")]
    for manifest in store.glob("databases/*/manifest.json"):
        try:
            database = Database.open(str(manifest.parent))
            for module in database.manifest["modules"]:
                for level in range(1, len(module["levels"])):
                    database.load(module["layer"], module["kind"], level)
        except Exception as error:  # noqa: BLE001 — any failure to read back is what we count
            problems.append(f"database {manifest.parent.name}: {error}")
    for path in list(store.rglob("*.json")):
        if ".tmp-" in path.name:
            continue
        try:
            json.loads(path.read_text())
        except ValueError as error:
            problems.append(f"{path.relative_to(store)}: {error}")
    for config in store.glob("runs/*/model/config.json"):
        try:
            from transformers import AutoModelForCausalLM

            importlib.import_module("darwinlm.core").register_pruned_classes()
            AutoModelForCausalLM.from_pretrained(str(config.parent))
        except Exception as error:  # noqa: BLE001
            problems.append(f"export {config.parent}: {error}")
    return problems


def fingerprint(run_uri: str) -> dict:
    """What must equal an uninterrupted run's: the genome and the exported weights' bytes."""
    run = Path(run_uri)
    genome = json.loads((run / "genome.json").read_text())
    weights = hashlib.sha256()
    for path in sorted((run / "model").glob("*.safetensors")):
        weights.update(path.read_bytes())
    return {"attn": genome["attn"], "mlp": genome["mlp"], "weights": weights.hexdigest()}


def registered_versions(tracking_uri: str, name: str) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri=tracking_uri).search_model_versions(f"name='{name}'"))


def child_env(workspace: Path, api_url: str) -> dict:
    return dict(os.environ, PREFECT_API_URL=api_url, DARWINLM_HOME=str(workspace / "home"),
                MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")

