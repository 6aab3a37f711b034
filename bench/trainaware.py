"""Does a short finetune inside selection predict which genome recovers best in post-training? (issue #16)

    python -m bench.trainaware [--genomes 10] [--eval-rows 8] [--long-subset 4] [--long-factor 4] [--seed 0]

On SmolLM2 with the smollm2-demo data at 50% of block parameters removed, takes fixed genomes of graded
quality (uniform, the informed start, and budget-neutral mutants of both at growing distances) and measures
for each:
  (i)   one-shot KL to the dense model on `--eval-rows` held-out fitness rows (what one-shot selection sees);
  (ii)  the same KL after the in-search finetune, for several finetune settings (tokens, lr: FINETUNES);
  (iii) in-domain held-out perplexity after the preset's standard post-training.
It reports the Spearman rank correlation of (i) with (iii) and of each (ii) with (iii), and, on a subset
spread over the range, whether the ranking holds under `--long-factor` × the post-training tokens.
Writes bench/results/trainaware.json (`trainaware_premise`) with provenance. About an hour on 2 cores.
"""

import argparse
import json
import random
import time

import torch

from bench.results_file import partial_path, provenance, write_partial, write_results
from darwinlm.core.evaluation.rank_correlation import spearman
from darwinlm.flows.offline import apply_offline_defaults

# In-search finetune settings to compare: name -> (finetune tokens, learning rate); AdamW, batch 1, constant lr.
# "demo" is what the smollm2-demo preset's training-aware stage does.
FINETUNES = {"demo": (1024, 1e-4), "demo_lr1e-5": (1024, 1e-5), "4k_lr3e-5": (4096, 3e-5)}


def rows_measured_by(run: dict) -> dict:
    """What makes two runs' per-genome rows the same measurement: everything but the longer post-training of a
    subset, which comes after every row."""
    config = {key: value for key, value in run["config"].items() if key not in ("long_subset", "long_factor")}
    return {**run, "config": config}


def graded_genomes(uniform: tuple, informed: tuple, budget, count: int, seed: int) -> dict[str, tuple]:
    """uniform, informed, then mutants of each by 1, 2, 4, 8, ... budget-neutral switches (alternating
    parents), so the set spans good to poor genomes near where a search goes."""
    from darwinlm.core.search.genome import budget_neutral_switch

    rng, genomes = random.Random(seed), {"uniform": uniform, "informed": informed}
    distance = 1
    while len(genomes) < count:
        for name, parent in (("uniform", uniform), ("informed", informed)):
            levels = list(parent)
            for _ in range(distance):
                budget_neutral_switch(levels, budget, rng)
            child = budget.repair(levels, rng)
            if child not in genomes.values() and len(genomes) < count:
                genomes[f"{name}+{distance}"] = child
        distance *= 2
    return genomes


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genomes", type=int, default=10)
    parser.add_argument("--eval-rows", type=int, default=8, help="held-out fitness rows of 512 tokens for the KLs")
    parser.add_argument("--long-subset", type=int, default=4, help="genomes also post-trained --long-factor longer")
    parser.add_argument("--long-factor", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="trainaware", help="results name: bench/results/NAME.json")
    args = parser.parse_args()
    origin = provenance(config={**vars(args), "finetunes": FINETUNES}, seeds={"mutants": args.seed})
    from dataclasses import replace

    from darwinlm.core.config import load_preset
    from darwinlm.core.database.store import build_database
    from darwinlm.core.evaluation.metrics import perplexity
    from darwinlm.core.home import data_home
    from darwinlm.core.model.assembly import LiveAssembly
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.pipeline import post_train, prepare_data
    from darwinlm.core.search.evolution import Search
    from darwinlm.core.search.finetune import finetune
    from darwinlm.core.search.fitness import compute_teacher, kl_per_token
    from darwinlm.core.search.genome import Genome

    config = load_preset("smollm2-demo")
    base_rows = config.data.post_train_rows
    long_config = load_preset("smollm2-demo", {"data": {"post_train_rows": base_rows * args.long_factor}})
    model, tokenizer = load_model("smollm2")
    data = prepare_data(long_config, tokenizer)  # the same stream: its first post-training rows are the standard's
    standard_rows, long_rows = data.post_train_ids[:base_rows], data.post_train_ids
    database = build_database(model, data.calibration_ids, str(data_home() / "databases"),
                              calibration_digest=data.calibration_digest, config=config.database, progress=True)
    fitness_teacher = compute_teacher(model, data.fitness_ids, config.teacher_top_k)
    fixed = config.search.fixed_rows  # never selected on by a search: held out here too
    eval_teacher = fitness_teacher.rows(torch.arange(fixed, fixed + args.eval_rows))
    post_teacher = compute_teacher(model, long_rows, config.teacher_top_k)
    windows = data.eval_windows["in_domain"]
    assembly = LiveAssembly(model, database)
    search = Search(assembly, fitness_teacher, data.train_ids, replace(config.search, start="informed"))

    def kl_after(levels, rows: torch.Tensor | None, lr: float) -> float:
        assembly.apply(Genome(levels, database.digest).assignment(), rebuild=True)
        if rows is not None:
            finetune(model, rows, replace(config.search.finetune, lr=lr, batch_size=1))
        return kl_per_token(model, eval_teacher)

    def post_trained_ppl(levels, rows: torch.Tensor) -> float:
        post_train(assembly, Genome(levels, database.digest), rows, config,
                   teacher=post_teacher.rows(torch.arange(rows.shape[0])), progress=True)
        return perplexity(model, windows)

    # A run that stopped part-way resumes from the rows it had measured, if they were measured the same way (the
    # rows then carry the provenance of the run that measured them: `resumed_rows_provenance`). Its genomes are
    # reused too: they are a function of the config, and the informed start costs minutes to recompute.
    earlier = json.loads(partial_path(args.results).read_text()) if partial_path(args.results).exists() else {}
    measured_by = rows_measured_by({"config": json.loads(json.dumps(origin["config"]))})
    same = "run" in earlier and rows_measured_by({"config": earlier["run"]["config"]}) == measured_by
    if same:
        genomes = {name: tuple(levels) for name, levels in earlier["run"]["genomes"].items()}
    else:
        informed, _ = search.choose_start()
        genomes = graded_genomes(search.budget.uniform(), informed, search.budget, args.genomes, args.seed)
    resumable = json.loads(json.dumps({"config": origin["config"],
                                       "genomes": {name: list(levels) for name, levels in genomes.items()}}))
    done = {row["genome"]: row for row in earlier.get("rows", [])} if same else {}
    first_origin = earlier["origin"] if done else origin
    rows, started = [], time.perf_counter()
    for name, levels in genomes.items():
        if name in done:
            rows.append(done[name])
            continue
        row = {"genome": name, "kept_params": search.budget.cost(levels), "oneshot_kl": kl_after(levels, None, 0.0)}
        for setting, (tokens, lr) in FINETUNES.items():
            train = data.train_ids[: tokens // data.train_ids.shape[1]]  # the same rows for every genome
            row[f"finetuned_kl_{setting}"] = kl_after(levels, train, lr)
        row["ppl_posttrained"] = post_trained_ppl(levels, standard_rows)
        rows.append({**row, "levels": list(levels)})
        print(f"{name:<14} one-shot KL {row['oneshot_kl']:.4f}  post-trained ppl {row['ppl_posttrained']:.2f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        write_partial(args.results, {"run": resumable, "origin": first_origin, "rows": rows})

    standard = [row["ppl_posttrained"] for row in rows]
    by_quality = sorted(range(len(rows)), key=standard.__getitem__)
    subset = sorted({by_quality[round(i * (len(rows) - 1) / max(1, args.long_subset - 1))]
                     for i in range(args.long_subset)})
    for index in subset:
        if "ppl_posttrained_long" not in rows[index]:
            rows[index]["ppl_posttrained_long"] = post_trained_ppl(tuple(rows[index]["levels"]), long_rows)
            write_partial(args.results, {"run": resumable, "origin": first_origin, "rows": rows})

    premise = {
        "genomes": len(rows), "eval_tokens": args.eval_rows * data.fitness_ids.shape[1],
        "post_train_tokens": int(standard_rows.numel()), "long_post_train_tokens": int(long_rows.numel()),
        "spearman_oneshot": spearman([row["oneshot_kl"] for row in rows], standard),
        "spearman_finetuned": {setting: spearman([row[f"finetuned_kl_{setting}"] for row in rows], standard)
                               for setting in FINETUNES},
        "spearman_long_vs_standard": spearman([rows[i]["ppl_posttrained"] for i in subset],
                                              [rows[i]["ppl_posttrained_long"] for i in subset]),
        "finetunes": {setting: {"tokens": tokens, "lr": lr} for setting, (tokens, lr) in FINETUNES.items()},
        "rows": rows,
    }
    resumed = {"resumed_rows_provenance": first_origin} if first_origin is not origin else {}
    write_results(args.results, {"trainaware_premise": premise, "run_s": time.perf_counter() - started, **resumed},
                  echo=False, origin=origin)
    print(f"\nSpearman with post-trained ppl over {len(rows)} genomes: one-shot KL {premise['spearman_oneshot']:+.2f}; "
          + ", ".join(f"finetuned ({s}) {r:+.2f}" for s, r in premise["spearman_finetuned"].items())
          + f"; long vs standard post-training ({len(subset)} genomes) {premise['spearman_long_vs_standard']:+.2f}")


if __name__ == "__main__":
    main()
