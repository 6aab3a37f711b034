"""Print the study's table from its runs and the references of experiments/2026-12-05-out-of-domain-validation
(uniform, the informed start and the search on the plain pool, all through `darwinlm compress`).

    .venv/bin/python experiments/2026-12-05-self-generated-selection/table.py [validation|test]

Validation windows choose; test windows are printed only to report beside them. Every figure is post-trained.
"""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
REFERENCE = HERE.parent / "2026-12-05-out-of-domain-validation" / "runs"
SETS = ("sotu", "moby", "email", "npm_docs")
SEEDS = (0, 1, 2)


def reference(name: str, split: str) -> dict:
    evaluation = json.loads((REFERENCE / name / "evaluation.json").read_text())
    return evaluation["validation" if split == "validation" else "pruned"]


def arm(name: str, split: str) -> dict | None:
    path = HERE / "runs" / f"{name}.json"
    return json.loads(path.read_text())[split] if path.exists() else None


def seed_mean(rows: list[dict]) -> dict:
    """Each set's mean over seeds, with the population sd over seeds in place of the window se."""
    return {key: value for name in SETS for key, value in (
        (f"ppl_{name}", statistics.fmean(row[f"ppl_{name}"] for row in rows)),
        (f"ppl_{name}_se", statistics.pstdev(row[f"ppl_{name}"] for row in rows)))}


def main() -> None:
    split = sys.argv[1] if sys.argv[1:] else "validation"
    rows = {"uniform": reference("uniform", split), "informed start, plain pool": reference("informed-start", split),
            "informed start, plain pool (this script)": arm("control-informed", split),
            "informed start, mixed pool": arm("mixed-informed", split)}
    plain = [reference(f"searched-seed{seed}", split) for seed in SEEDS]
    rows["searched, plain pool (3 seeds)"] = seed_mean(plain)
    groups = {}
    for prefix, label in (("mixed", "searched, mixed pool"), ("mixedsel", "searched from the plain start, mixed pool"),
                          ("mixedsel25", "searched from the plain start, a quarter generated")):
        groups[prefix] = [row for row in (arm(f"{prefix}-seed{seed}", split) for seed in SEEDS) if row]
        if groups[prefix]:
            rows[f"{label} ({len(groups[prefix])} seeds)"] = seed_mean(groups[prefix])
            for seed, row in zip(SEEDS, groups[prefix]):
                rows[f"  {prefix} seed {seed}"] = row
    print(f"\n### {split} windows, post-trained (± window se, or sd over seeds)\n")
    print("| run | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    for name, figures in rows.items():
        if figures:
            print(f"| {name} | " + " | ".join(f"{figures[f'ppl_{s}']:.1f} ± {figures[f'ppl_{s}_se']:.1f}"
                                            for s in SETS) + " |")
    searched = [name for name in rows if name.startswith("searched")]
    references = [name for name in ("uniform", "informed start, plain pool", "informed start, mixed pool")
                  if rows.get(name)]
    print("\n| ratio | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    for name in searched:
        for against in references:
            print(f"| {name} ÷ {against} | " + " | ".join(
                f"{rows[name][f'ppl_{s}'] / rows[against][f'ppl_{s}']:.2f}" for s in SETS) + " |")
    for prefix, group in groups.items():
        for seed, row in zip(SEEDS, group):
            print(f"| {prefix} seed {seed} ÷ plain seed {seed} | " + " | ".join(
                f"{row[f'ppl_{s}'] / plain[seed][f'ppl_{s}']:.2f}" for s in SETS) + " |")


if __name__ == "__main__":
    main()
