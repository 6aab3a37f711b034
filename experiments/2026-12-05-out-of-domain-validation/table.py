"""Print the study's tables from the runs' own files: each run's evaluation.json and genome.json.

    .venv/bin/python experiments/2026-12-05-out-of-domain-validation/table.py [--collect]

--collect first copies them from the run folders in the store (the `model_uri` of runs/<run>.json) to
runs/<run>/, where this folder keeps them.

Validation windows choose; test windows report. Per run: perplexity ± window se on every evaluation set, before
post-training is not measured by the pipeline (it evaluates what it ships), so every figure is post-trained.
Also how extreme the genome is: the highest attention and MLP level any layer takes (attention levels 0-3 keep 9,
6, 3 or 0 query heads; MLP level k removes k tenths of the channels, aligned to 32), and the spread of levels.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
SETS = ("sotu", "moby", "email", "npm_docs")
RUNS = ("uniform", "informed-start", "searched-seed0", "searched-seed1", "searched-seed2",
        "searched-25-seed0", "searched-25-seed1", "searched-25-seed2")
GROUPS = {"searched": "searched-seed", "searched, 25 generations": "searched-25-seed"}


def collect(name: str) -> None:
    summary = json.loads((HERE / "runs" / f"{name}.json").read_text())
    store_folder = Path(summary["model_uri"]).parent
    (HERE / "runs" / name).mkdir(exist_ok=True)
    for file in ("evaluation.json", "genome.json"):
        shutil.copyfile(store_folder / file, HERE / "runs" / name / file)


def row(name: str) -> dict:
    folder = HERE / "runs" / name
    evaluation = json.loads((folder / "evaluation.json").read_text())
    genome = json.loads((folder / "genome.json").read_text())
    return {"validation": evaluation["validation"], "test": evaluation["pruned"], "dense": evaluation["dense"],
            "attn": genome["attn"], "mlp": genome["mlp"], "start": genome.get("start", {}).get("chosen")}


def cell(figures: dict, name: str) -> str:
    return f"{figures[f'ppl_{name}']:.1f} ± {figures[f'ppl_{name}_se']:.1f}"


def main() -> None:
    finished = [name for name in RUNS if (HERE / "runs" / f"{name}.json").exists()]
    if "--collect" in sys.argv[1:]:
        for name in finished:
            collect(name)
    rows = {name: row(name) for name in finished}
    for split in ("validation", "test"):
        print(f"\n### {split} windows (post-trained)\n")
        print("| run | " + " | ".join(SETS) + " | highest level attn / mlp | level sd attn / mlp |")
        print("|---|" + "---|" * (len(SETS) + 2))
        for name, figures in rows.items():
            extreme = f"{max(figures['attn'])} / {max(figures['mlp'])}"
            spread = f"{statistics.pstdev(figures['attn']):.2f} / {statistics.pstdev(figures['mlp']):.2f}"
            print(f"| {name} | " + " | ".join(cell(figures[split], s) for s in SETS) + f" | {extreme} | {spread} |")
    for label, prefix in GROUPS.items():
        searched = [rows[name] for name in rows if name.startswith(prefix)]
        if not searched:
            continue
        for split in ("validation", "test"):
            print(f"\n### {label} (mean over {len(searched)} seeds, ± population sd), {split} windows\n")
            print("| | " + " | ".join(SETS) + " |")
            print("|---|" + "---|" * len(SETS))
            figures = {s: [r[split][f"ppl_{s}"] for r in searched] for s in SETS}
            print("| mean ± sd | " + " | ".join(
                f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" for v in figures.values()) + " |")
            for reference in ("uniform", "informed-start"):
                ratios = [f"{statistics.mean(figures[s]) / rows[reference][split][f'ppl_{s}']:.3f}" for s in SETS]
                print(f"| ÷ {reference} | " + " | ".join(ratios) + " |")

if __name__ == "__main__":
    main()
