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
