"""Writing a benchmark's figures: a metric/value/goal table on stdout and bench/results/NAME.json, atomically."""

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def write_results(name: str, results: dict, goals: dict[str, str] | None = None, echo: bool = True) -> Path:
    """Print scalar results beside their goals (nested values are left to the caller) and write the JSON."""
    if echo:
        print(f"\n{'metric':<40} {'value':>14}  goal")
        for key, value in results.items():
            if isinstance(value, (dict, list)):
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"{key:<40} {shown:>14}  {(goals or {}).get(key, '')}")
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(path)
    if echo:
        print(f"\nwrote {path}")
    return path


def provenance(config: dict | None = None, seeds: dict | None = None) -> dict:
    """Where a results file came from: commit (and whether the tree had uncommitted changes), the command line,
    the benchmark's config, the date, the machine (cores, torch threads, load) and the seeds."""
    import datetime
    import os
    import platform
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        try:
            return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    command = ["python", "-m", module, *sys.argv[1:]] if module else ["python", *sys.argv]
    torch = sys.modules.get("torch")  # only when the benchmark uses it: importing it here would cost seconds
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        "command": shlex.join(command),
        "config": config or {},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads() if torch else None,
                    "platform": platform.platform(), "load_average_1_5_15": list(os.getloadavg())},
        "seeds": seeds or {},
    }
