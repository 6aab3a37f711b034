"""`make demo` as a benchmark: compress SmolLM2-135M with the smollm2-demo preset through the `darwinlm` command,
then write its dense-vs-pruned table to bench/results/demo.json with provenance.

    python -m bench.demo [--preset smollm2-demo]

The run is exactly `darwinlm compress --preset smollm2-demo` (same code path, same table on stdout), into its own
store, `$DARWINLM_HOME/bench-demo`, emptied first: a compression resumes a finished run of the same config at no
cost, so in the default store a second measurement would time a resume, not a compression. The model, text,
MLflow and registry are the usual ones. About 35 minutes on 2 quiet cores, database build included.

With `--rerun-seed N` it then compresses again with search seed N in the same store, as a user trying another
seed does, and records that run's wall time and figures under `rerun`: the database, the teachers and the dense
model's evaluation are the first run's (stored by content), so this is what a second run of the same model and
text costs.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.results_file import provenance, write_results
from darwinlm.flows.offline import apply_offline_defaults


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-demo")
    parser.add_argument("--rerun-seed", type=int, default=None,
                        help="then compress again with this search seed in the same store, and record that run too")
    args = parser.parse_args()
    from darwinlm.core.config import load_preset
    from darwinlm.core.home import data_home
    from darwinlm.flows.cli import main as darwinlm

    config = load_preset(args.preset)
    origin = provenance(config={"preset": args.preset, **config.to_dict()}, seeds={"search": config.search.seed,
                                                                                   "data": config.data.seed})
    store = data_home() / "bench-demo"
    shutil.rmtree(store, ignore_errors=True)  # database and run from scratch, as on a fresh machine
    command = ["compress", "--preset", args.preset, "--store", str(store)]
    table = compressed(darwinlm, command)
    # the table `darwinlm compress --results` writes, key by key, so this file says what demo.json holds
    keys = ("wall_s", "dense", "pruned", "evaluation_labels", "kept_block_fraction", "model_uri", "mlflow_run_id")
    results = {key: table[key] for key in keys}
    if args.rerun_seed is not None:
        again = compressed(darwinlm, command + ["--seed", str(args.rerun_seed)])
        results["rerun"] = {"seed": args.rerun_seed, **{key: again[key] for key in ("wall_s", "pruned", "model_uri")},
                            "dense_as_first_run": dense_figures(again) == dense_figures(table)}
    write_results("demo", results, echo=False, origin=origin)


def dense_figures(table: dict) -> dict:
    """The dense row but its prefill speed, which every run times again beside its pruned model (a speed
    ratio needs both timed in one run): what a second run reads from the store."""
    return {key: value for key, value in table["dense"].items() if key != "prefill_tokens_per_s"}


def compressed(darwinlm, command: list[str]) -> dict:
    """The summary table of `darwinlm <command>`; exits as it did when it failed (it has said why, and
    bench/results/demo.json is left as it was)."""
    with tempfile.TemporaryDirectory(prefix="darwinlm-demo-") as folder:
        path = Path(folder) / "demo.json"
        status = darwinlm(command + ["--results", str(path)])
        if status != 0:
            sys.exit(status)
        return json.loads(path.read_text())


if __name__ == "__main__":
    main()
