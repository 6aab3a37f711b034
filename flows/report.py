"""The table a compression ends with, and its JSON form (bench/results/demo.json for `make demo`)."""

import json
from pathlib import Path

from darwinlm.core.evaluation.metrics import is_se_key, with_se
from darwinlm.tasks.tracking import tracking_uri

def rows(evaluation: dict, labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """(label, key, format spec) per row: one perplexity row per evaluation set, named by the data source, in
    the order the rows hold them (the split's: the in-domain set first)."""
    sets = list(dict.fromkeys(key.removeprefix("ppl_") for side in ("dense", "pruned") if side in evaluation
                              for key in evaluation[side] if key.startswith("ppl_") and not is_se_key(key)))
    return [("parameters", "params", ",.0f"),
            *[(f"ppl {labels.get(name, name.replace('_', '-'))}", f"ppl_{name}", ".2f") for name in sets],
            ("KL to dense / token", "kl", ".4f"),
            ("zero-shot accuracy (mean)", "zeroshot_acc", ".3f"),
            ("prefill tokens/s", "prefill_tokens_per_s", ".0f")]


def print_summary(summary: dict) -> None:
    """The dense-vs-pruned table; a figure with a standard error shows as `value ± se`."""
    dense, pruned = summary["evaluation"]["dense"], summary["evaluation"]["pruned"]
    kept = summary["kept_params"] / summary["dense_params"]
    print(f"\ncompressed in {summary['wall_s']:.0f} s · block parameters kept: {kept:.1%}")
    print(f"{'':<32}{'dense':>18}{'pruned':>18}")
    tasks = [("  " + key[4:], key, ".3f") for key in sorted(pruned) if key.startswith("acc_") and not is_se_key(key)]
    for label, key, spec in [row for row in rows(summary["evaluation"], summary.get("evaluation_labels", {}))
                             for row in ([row, *tasks] if row[1] == "zeroshot_acc" else [row])]:
        if key in dense or key in pruned:
            cells = [with_se(row, key, spec) if key in row else "—" for row in (dense, pruned)]
            print(f"{label:<32}{cells[0]:>18}{cells[1]:>18}")
    if "prefill_tokens_per_s" in dense:
        print(f"{'prefill speedup':<32}{'':>18}{pruned['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:>17.2f}×")
    if "windows" in summary["evaluation"]:
        print(windows_line(summary["evaluation"]["windows"]))
    print(f"\npruned model:   {summary['model_uri']}")
    print(f"MLflow:         run {summary['mlflow_run_id']} · registered {summary['registered_model']} "
          f"v{summary['registered_version']} · `darwinlm mlflow-ui` (store {tracking_uri()})")
    print("Prefect:        flow 'compress' · `darwinlm server` then open http://127.0.0.1:4200")


def windows_line(windows: dict) -> str:
    """Which held-out windows the table's perplexities and KL read, in words."""
    sets = ", ".join(f"{name} {used['count']} spread over {used['spread_over_tokens']:,} of "
                     f"{used['stream_tokens']:,} tokens" for name, used in windows["sets"].items())
    return f"held-out figures on the {windows['split']} windows ({sets})"


def write_results(summary: dict, path: str) -> None:
    """{"wall_s": t, "dense": {...}, "pruned": {...}, "validation": {...}} plus what identifies the run; atomic
    write. Each figure that has a standard error carries it beside it as `<figure>_se` (ppl_sotu_se,
    acc_<task>_se). `dense` and `pruned` are read on the test windows; `validation` is the pruned model on the
    validation windows, the figures to choose settings on."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"wall_s": summary["wall_s"], "dense": summary["evaluation"]["dense"],
               "pruned": summary["evaluation"]["pruned"], "evaluation_labels": summary.get("evaluation_labels", {}),
               "windows": summary["evaluation"].get("windows"),
               "validation": summary["evaluation"].get("validation"),
               "kept_block_fraction":
               summary["kept_params"] / summary["dense_params"], "model_uri": summary["model_uri"],
               "mlflow_run_id": summary["mlflow_run_id"]}
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(target)
