"""Writing a benchmark's figures: a metric/value/goal table on stdout and bench/results/NAME.json, atomically,
with the provenance that lets anyone regenerate them (commit, command, config, date, machine, seeds) and a digest
of the contents that shows none was edited by hand."""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
REPOSITORY = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def provenance(config: dict | None = None, seeds: list | dict | None = None) -> dict:
    """Where a results file came from: the commit (and whether the tree had uncommitted changes), the command
    line, the resolved config, the date, the machine (with its load: timings on a busy machine drift), and the
    seeds."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "commit": _git("rev-parse", "HEAD") or None,
        # results files are the benches' own output, not code: rewriting one does not make a run dirty
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")),
        "command": " ".join(["python", "-m", _module_name(), *sys.argv[1:]]),
        "config": config or {},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_1_5_15": list(os.getloadavg())},
        "seeds": seeds if seeds is not None else [],
    }


def _module_name() -> str:
    """`bench.headline` for `python -m bench.headline` (sys.argv[0] is then the file's path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return spec.name
    path = Path(sys.argv[0]).resolve()
    try:
        return ".".join(path.relative_to(REPOSITORY).with_suffix("").parts)
    except ValueError:
        return str(path)


def partial_path(name: str) -> Path:
    """Where a long bench keeps what it has measured so far: outside bench/results, so a run that stops
    part-way leaves the committed results file as it was (and a rerun can read what was lost, if it wants)."""
    from darwinlm.core.home import data_home

    return data_home() / "bench-partial" / f"{name}.json"


def write_partial(name: str, results: dict) -> Path:
    """Save a long run's results so far (see partial_path); the results file itself is written once, at the end."""
    return _write_json(partial_path(name), results)


def code_unchanged_since(commit: str, paths: tuple[str, ...], repository: Path = REPOSITORY) -> bool:
    """Whether `paths` in the working tree are as they were at `commit` (False when git cannot tell, e.g. the
    commit is not in this clone)."""
    try:
        return subprocess.run(["git", "diff", "--quiet", commit, "--", *paths], cwd=repository,
                              capture_output=True).returncode == 0
    except OSError:
        return False


def resumable_partial(name: str, run: dict, measured_by: tuple[str, ...],
                      repository: Path = REPOSITORY) -> dict | None:
    """The rows an earlier, stopped run of bench NAME saved (see write_partial) that this run can keep: None unless
    that run had the same `run` (its JSON config) and the code at `measured_by` has not changed since its commit,
    so its rows are what this run would measure. The partial holds `run`, `origin` (the earlier run's provenance,
    for the results file to record) and the rows; why it is not kept is printed."""
    path = partial_path(name)
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    commit = (earlier.get("origin") or {}).get("commit")
    if "run" not in earlier:
        reason = "an older bench that recorded no configuration"
    elif earlier["run"] != json.loads(json.dumps(run)):
        reason = "a different configuration"
    elif not commit or not code_unchanged_since(commit, measured_by, repository):
        reason = f"code that has changed since ({', '.join(measured_by)} at {commit or 'an unknown commit'})"
    else:
        print(f"resuming from {path}: rows measured at {commit[:12]} on {earlier['origin'].get('date')}", flush=True)
        return earlier
    print(f"not resuming from {path}: it was measured with {reason}; starting afresh", flush=True)
    return None


def write_results(name: str, results: dict, goals: dict[str, str] | None = None, echo: bool = True, *,
                  origin: dict) -> Path:
    """Print scalar results beside their goals (nested values are left to the caller) and write
    bench/results/NAME.json with `origin` as its provenance, atomically. Call it once, when the run has finished;
    take `origin = provenance(...)` when it starts (the commit and the tree then are what ran)."""
    results = {**results, "provenance": origin}
    results["provenance"] = {**origin, "content_sha256": content_digest(results)}
    if echo:
        print(f"\n{'metric':<40} {'value':>14}  goal")
        for key, value in results.items():
            if isinstance(value, (dict, list)):
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"{key:<40} {shown:>14}  {(goals or {}).get(key, '')}")
    path = _write_json(RESULTS_DIR / f"{name}.json", results)
    partial_path(name).unlink(missing_ok=True)
    if echo:
        print(f"\nwrote {path}")
    return path


def content_digest(results: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a results file's contents without
    `provenance.content_sha256` itself: recorded in the provenance, it shows that no figure was edited after the run
    (tests/test_results_files.py checks it). The contents are first put through JSON, as the file holds them
    (tuples become lists, number keys strings), so the digest is of what a reader of the file sees."""
    contents = json.loads(json.dumps(results))
    contents.get("provenance", {}).pop("content_sha256", None)
    return hashlib.sha256(json.dumps(contents, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_json(path: Path, value: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    temporary.replace(path)
    return path
