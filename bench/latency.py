"""Latency benchmark: does a latency table measured in llama.cpp predict what pruned SmolLM2 models run at there?

    python -m bench.latency [--threads 2] [--seq-len 512] [--reps 7] [--random 4] [--seed 1]

The table (darwinlm.core.search.latency, engine llama.cpp) is measured afresh on the database of what the pipeline
ships (the demo's run that bench/results/demo.json names, else bench.export's uniform-50% database; both have the
default ladders). It predicts each module at each level from whole-model prefill times, assuming the modules' costs
add up. Then whole models, none of them a variant the table timed, are exported to GGUF and timed in llama.cpp,
interleaved in rotated rounds with dense: uniform 50% of parameters, what the demo ships, `--random` genomes drawn
at random and repaired to 50% of parameters (shapes far from uniform), and uniform 30% and 50% of the table's own
latency budget. For each, the table's predicted prefill speedup over dense (the table's measured dense time over its
sum at the genome's levels) is set against the measured one; issue 38 accepts a llama.cpp cost model that predicts
within 10%. The parameter count's own "prediction" (dense ÷ kept block parameters) is shown beside it: what a params
budget assumes. Spearman's rank correlation of each with the measured speedups says how well it orders the genomes.
Writes bench/results/latency.json.
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.results_file import RESULTS_DIR, provenance, write_results
from darwinlm.flows.offline import apply_offline_defaults

GOALS = {"max_abs_prediction_error": "≤ 0.10", "spearman_predicted_vs_measured": "> spearman_params_vs_measured"}


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, for the table and the check")
    parser.add_argument("--seq-len", type=int, default=512, help="prompt tokens per prefill")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds, for the table and the check")
    parser.add_argument("--random", type=int, default=4, help="random genomes at 50%% of parameters")
    # seed 0's genomes chose the predictor (experiments/2026-12-05-llama-cpp-latency-table): reported on others
    parser.add_argument("--seed", type=int, default=1, help="seed of the random genomes")
    parser.add_argument("--rows", type=int, default=64, help="calibration rows if bench.export's database is built")
    return parser.parse_args()


def _shipped():
    """(the shipped run's database root, its genome's levels, where it came from), or None without a demo run."""
    demo = RESULTS_DIR / "demo.json"
    if not demo.is_file():
        return None
    run = Path(json.loads(demo.read_text())["model_uri"]).parent
    if not (run / "genome.json").is_file():
        return None
    genome = json.loads((run / "genome.json").read_text())
    levels = {(layer, kind): level for kind in ("attn", "mlp") for layer, level in enumerate(genome[kind])}
    return str(run.parent.parent / "databases" / genome["database"]), levels, f"shipped: {run}"


def _genomes(database, table: dict, shipped, count: int, seed: int) -> dict[str, dict]:
    """{name: {(layer, kind): level}} of the whole models checked against the table."""
    from darwinlm.core.search.genome import Budget, Genome

    def assignment(levels) -> dict:
        return Genome(tuple(levels), database.digest).assignment()

    params = Budget.from_database(database, fraction_removed=0.5)
    genomes = {"uniform_params_50": assignment(params.uniform())}
    if shipped is not None:
        genomes["shipped"] = shipped
    rng = random.Random(seed)
    for index in range(count):
        drawn = [rng.randrange(len(costs)) for costs in params.costs]
        genomes[f"random_params_50_{index}"] = assignment(params.repair(drawn, rng))
    for fraction in (0.3, 0.5):
        latency = Budget.from_database(database, fraction_removed=fraction, kind="latency", latency=table)
        genomes[f"uniform_latency_{int(fraction * 100)}"] = assignment(latency.uniform())
    return genomes


def _measured_speedups(assembly, tokenizer, genomes: dict, args, scratch: Path) -> dict[str, float]:
    """Dense prefill seconds ÷ each genome's, in llama.cpp, medians of interleaved rotated rounds."""
    from darwinlm.core.evaluation.timing import interleaved_medians
    from darwinlm.core.export.gguf import export_gguf
    from darwinlm.core.search.latency import gguf_prefill_seconds

    files = {}
    for name, levels in {"dense": {}, **genomes}.items():
        assembly.apply({**{key: 0 for key in assembly.levels}, **levels})
        files[name] = scratch / f"{name}.gguf"
        export_gguf(assembly.model, tokenizer, str(files[name]), quant="f16")
    assembly.apply({key: 0 for key in assembly.levels})
    vocab = int(assembly.model.config.vocab_size)
    prompt = [(17 + 7919 * i) % vocab for i in range(args.seq_len)]

    def progress(round_index: int, latest: dict) -> None:
        print(f"round {round_index + 1}/{args.reps}: " + " ".join(
            f"{name}={seconds * 1e3:.0f}ms" for name, seconds in latest.items()), flush=True)

    seconds = interleaved_medians({name: (lambda path=path: gguf_prefill_seconds(path, prompt, args.threads))
                                   for name, path in files.items()}, args.reps, warmup=False, on_repeat=progress)
    return {name: seconds["dense"] / seconds[name] for name in genomes}


def main() -> None:
    apply_offline_defaults()
    from bench.export import build_database_timed
    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.store import Database, model_digest
    from darwinlm.core.evaluation.rank_correlation import spearman
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.search.latency import measure_llama_cpp_table, predicted_speedup

    args, started = _arguments(), time.perf_counter()
    origin = provenance(config=vars(args), seeds={"random_genomes": args.seed})
    model, tokenizer = load_model("smollm2")
    digest = model_digest(model)
    shipped = _shipped()
    if shipped is not None:
        database, shipped_levels, shipped_source = Database.open(shipped[0]), shipped[1], shipped[2]
    else:
        database, _ = build_database_timed(model, tokenizer, default_split(), args.rows, digest)
        shipped_levels, shipped_source = None, None
    assembly = LiveAssembly(model.eval(), database, base_model_digest=digest)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch:
        table_started = time.perf_counter()
        table = measure_llama_cpp_table(assembly, tokenizer, seq_len=args.seq_len, threads=args.threads,
                                        repeats=args.reps, scratch=Path(scratch) / "table", progress=True)
        table_s = time.perf_counter() - table_started
        genomes = _genomes(database, table, shipped_levels, args.random, args.seed)
        measured = _measured_speedups(assembly, tokenizer, genomes, args, Path(scratch))
    dense_params = database.manifest["dense_params"]
    checks = {}
    for name, levels in genomes.items():
        predicted = predicted_speedup(table, levels)
        kept = sum(database.params(layer, kind, level) for (layer, kind), level in levels.items())
        checks[name] = {"predicted_speedup": predicted, "measured_speedup": measured[name],
                        "prediction_error": predicted / measured[name] - 1,
                        "params_speedup": dense_params / kept, "kept_params_fraction": kept / dense_params}
    results = {
        "model": "SmolLM2-135M-Instruct", "database": database.digest, "shipped_model": shipped_source,
        "table_device": table["device"], "table_seq_len": table["seq_len"], "table_s": table_s,
        "table_variants": len(table["variant_seconds"]),
        "max_abs_prediction_error": max(abs(check["prediction_error"]) for check in checks.values()),
        "max_abs_params_error": max(abs(check["params_speedup"] / check["measured_speedup"] - 1)
                                    for check in checks.values()),
        # how well each orders the genomes by speed: common-mode drift between the table's run and the check's
        # moves every error alike, not the order
        **{f"spearman_{predictor}_vs_measured": spearman([check[f"{predictor}_speedup"] for check in checks.values()],
                                                          [check["measured_speedup"] for check in checks.values()])
           for predictor in ("predicted", "params")},
        "genomes": checks, "table": table,
        "load_average_during_timing": [load_before[0], os.getloadavg()[0]],
        "run_s": time.perf_counter() - started,
    }
    write_results("latency", results, GOALS, origin=origin)


if __name__ == "__main__":
    main()
