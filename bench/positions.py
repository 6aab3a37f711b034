"""Where in a row the noise of a selection decision sits, on SmolLM2: paired KL differences between mutants and
their parent, position by position, on the search's 512-token selection rows.

    python -m bench.positions [--fraction 0.5] [--rows 24] [--children 12] [--parent informed|uniform]

The parent is the informed start (as the smollm2-demo preset's search chooses it) or uniform; its children are
`--children` mutants of up to 3 level switches, as a generation draws them. Every genome's bucketed KL to the dense
model is taken at every position of `--rows` selection rows (past the search's fixed rows). Per band of positions:
the mean |child − parent| difference, the sd over rows of its band mean, and the per-token sd. Per number of first
positions left out of the mean (search.kl_skip_tokens): the standard error of a decision on 3 rows (the
preset's last stage), the median |mean difference|, the median |z| of a decision, and the correlation of the
children's mean differences with those counting every position (how much the skip changes what is measured).
Writes bench/results/positions.json. About 5 minutes on 2 cores with the database built.
"""

import argparse
import math
import random
import time
from types import SimpleNamespace

import torch

from bench.results_file import provenance, write_results
from bench.search import bench_preset, method_config
from darwinlm.flows.offline import apply_offline_defaults

BANDS = ((0, 8), (8, 32), (32, 64), (64, 128), (128, 256), (256, 512))
SKIPS = (0, 8, 16, 32, 64, 128, 256)
DECISION_ROWS = 3  # the smollm2-demo preset's last stage: 1536 tokens


def position_figures(kl: torch.Tensor) -> dict:
    """From per-position KL (genomes, rows, positions), the parent first: the band and skip tables."""
    difference = (kl[1:] - kl[:1]).double()  # (children, rows, positions)
    everything = difference.mean(-1).mean(-1)
    bands, skips = {}, {}
    for first, last in BANDS:
        if first >= kl.shape[-1]:
            break
        band = difference[:, :, first:last]
        bands[f"{first}-{last}"] = {"mean_abs_difference": band.mean(-1).mean(-1).abs().mean().item(),
                                    "row_sd_of_band_mean": band.mean(-1).std(-1).mean().item(),
                                    "token_sd": band.std().item()}
    for skip in SKIPS:
        if skip >= kl.shape[-1]:
            break
        per_row = difference[:, :, skip:].mean(-1)  # (children, rows)
        mean, se = per_row.mean(-1), per_row.std(-1) / math.sqrt(DECISION_ROWS)
        skips[str(skip)] = {"decision_se_median": se.median().item(), "mean_abs_difference_median":
                            mean.abs().median().item(), "decision_abs_z_median": (mean.abs() / se).median().item(),
                            "correlation_with_every_position": torch.corrcoef(torch.stack([mean, everything]))[0, 1]
                            .item()}
    return {"bands": bands, "skips": skips}


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of block parameters removed")
    parser.add_argument("--rows", type=int, default=24, help="selection rows of 512 tokens")
    parser.add_argument("--children", type=int, default=12, help="mutants of the parent")
    parser.add_argument("--parent", choices=("informed", "uniform"), default="informed")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    if args.rows < 2 or args.children < 2:
        parser.error("--rows and --children must be at least 2")
    origin = provenance(vars(args), [0])

    from darwinlm.core.database.store import build_database
    from darwinlm.core.home import data_home
    from darwinlm.core.model.assembly import LiveAssembly
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.pipeline import prepare_data
    from darwinlm.core.search.evolution import Search
    from darwinlm.core.search.fitness import compute_teacher, kl_per_position
    from darwinlm.core.search.genome import Genome, offspring

    schedule = SimpleNamespace(model=args.model, fitness_rows=68, task_limit=0, generations=0, offspring=6)
    config = bench_preset(schedule, args.fraction)
    model, tokenizer = load_model(args.model)
    data = prepare_data(config, tokenizer)
    if data.fitness_ids.shape[0] < config.search.fixed_rows + args.rows:
        parser.error(f"the pool has {data.fitness_ids.shape[0] - config.search.fixed_rows} selection rows")
    database = build_database(model, data.calibration_ids, str(data_home() / "databases"),
                              calibration_digest=data.calibration_digest, config=config.database, progress=True)
    start = time.perf_counter()
    pool = compute_teacher(model, data.fitness_ids, config.teacher_top_k)
    rows = pool.rows(torch.arange(config.search.fixed_rows, config.search.fixed_rows + args.rows))
    assembly = LiveAssembly(model, database)
    search = Search(assembly, pool, data.train_ids, method_config("oneshot", config.search, 0, 0))
    parent = tuple(search.budget.uniform()) if args.parent == "uniform" else tuple(search.choose_start()[0])
    genomes = [parent] + offspring(parent, args.children, search.budget, random.Random(0))
    kls = []
    with torch.no_grad():
        for genome in genomes:
            assembly.apply(Genome(genome, database.digest).assignment(), rebuild=True)
            batches = []
            for first in range(0, args.rows, config.search.batch_size):
                batch = slice(first, first + config.search.batch_size)
                logits = model(rows.input_ids[batch], use_cache=False).logits
                batches.append(kl_per_position(logits, rows.top_logprobs[batch], rows.top_ids[batch]))
            kls.append(torch.cat(batches))
            print(f"measured {len(kls)} of {len(genomes)} genomes ({time.perf_counter() - start:.0f} s)", flush=True)
    figures = position_figures(torch.stack(kls))
    for name, band in figures["bands"].items():
        print(f"positions {name:>7}: token sd {band['token_sd']:.3f}, row sd of band mean "
              f"{band['row_sd_of_band_mean']:.4f}, mean |difference| {band['mean_abs_difference']:.4f}")
    results = {"model": args.model, "fraction_removed": args.fraction, "parent": args.parent, "rows": args.rows,
               "seq_len": int(rows.input_ids.shape[1]), "children": args.children, "decision_rows": DECISION_ROWS,
               **figures, "measure_s": time.perf_counter() - start}
    write_results("positions", results, origin=origin)


if __name__ == "__main__":
    main()
