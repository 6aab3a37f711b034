"""Neighbourhood benchmark on SmolLM2: is the one-shot search's result a local optimum, or does a genome one
level swap away have lower held-out perplexity?

    python -m bench.neighbourhood [--fraction 0.5] [--seed 0] [--generations G] [--offspring 6]
                                  [--screen-rows 2] [--confirm 24]

Runs the one-shot search of bench.search (the same preset, schedule and seed; G defaults to the preset's), then
takes every genome one budget-neutral swap from its result: one module a level more pruned and another of the same
cost class (a step within a quarter of the first's) a level less, kept when it meets the budget; that is the
search's smallest move. Each neighbour is screened by its KL to the dense model on `--screen-rows` selection rows,
the same rows for all, as a difference to the result's. The `--confirm` best are measured on the held-out windows
(SOTU and Moby-Dick, 40 of 512 tokens each), which no search step has seen: per text, the paired per-window NLL
difference to the result gives a z (negative: better than the result). Then swaps are combined, each kept when it
touches no module an earlier one did and the genome still meets the budget, and the genome measured held out: does
a genome a few swaps away reach what no single swap does? Two combinations: `combined`, of the confirmed swaps
better on both texts, least summed z first (chosen on the held-out windows it is measured on, so its figure is an
optimistic bound), and `combined_by_screen`, of the `--confirm` best-screened swaps in screening order (chosen on
selection rows only, so its held-out figure is unbiased). Writes bench/results/neighbourhood.json with the counts,
the confirmed rows, and the best neighbour's and the combinations' held-out ppl beside the result's and uniform's.
"""

import argparse
import math
import time
from types import SimpleNamespace

import torch

from bench.results_file import provenance, write_results
from bench.search import bench_preset, method_config
from darwinlm.flows.offline import apply_offline_defaults

TEXTS = {"in_domain": "sotu", "out_of_domain": "moby"}


def swaps(levels: tuple[int, ...], budget) -> list[tuple[int, int]]:
    """(raised, lowered) module indices of every same-cost-class swap from `levels` that meets the budget."""
    found = []
    for raised, level in enumerate(levels):
        if level == len(budget.costs[raised]) - 1:
            continue
        freed = budget.costs[raised][level] - budget.costs[raised][level + 1]
        for lowered, other in enumerate(levels):
            if lowered == raised or other == 0:
                continue
            added = budget.costs[lowered][other - 1] - budget.costs[lowered][other]
            candidate = swapped(levels, (raised, lowered))
            if abs(added - freed) <= freed / 4 and budget.feasible(candidate):
                found.append((raised, lowered))
    return found


def swapped(levels: tuple[int, ...], move: tuple[int, int]) -> tuple[int, ...]:
    raised, lowered = move
    changed = list(levels)
    changed[raised] += 1
    changed[lowered] -= 1
    return tuple(changed)


def combined(levels: tuple[int, ...], moves: list[tuple[int, int]], budget) -> tuple[tuple[int, ...], list]:
    """`levels` with as many of `moves` (best first) applied as touch disjoint modules and keep the budget;
    returns the genome and the moves applied."""
    genome, used, applied = tuple(levels), set(), []
    for move in moves:
        candidate = swapped(genome, move)
        if used.isdisjoint(move) and budget.feasible(candidate):
            genome, used = candidate, used | set(move)
            applied.append(move)
    return genome, applied


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of block parameters removed")
    parser.add_argument("--seed", type=int, default=0, help="search seed")
    parser.add_argument("--generations", type=int, help="default: the smollm2-demo preset's")
    parser.add_argument("--offspring", type=int, default=6)
    parser.add_argument("--fitness-rows", type=int, default=68, help="teacher pool, as bench.search")
    parser.add_argument("--screen-rows", type=int, default=2, help="selection rows of 512 tokens per neighbour")
    parser.add_argument("--confirm", type=int, default=24, help="best-screened neighbours measured held out")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    if args.screen_rows < 1 or args.confirm < 1:
        parser.error("--screen-rows and --confirm must be at least 1")
    if args.generations is None:  # the result a user of the preset gets, not an older, shorter schedule's
        from darwinlm.core.config import load_preset

        args.generations = load_preset("smollm2-demo").search.generations
    origin = provenance(vars(args), [args.seed])

    from darwinlm.core.database.store import build_database
    from darwinlm.core.evaluation.metrics import window_nlls
    from darwinlm.core.home import data_home
    from darwinlm.core.model.assembly import LiveAssembly
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.pipeline import prepare_data
    from darwinlm.core.search.evolution import Search, paired_z
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.genome import Genome, module_keys

    schedule = SimpleNamespace(model=args.model, fitness_rows=args.fitness_rows, task_limit=0,
                               generations=args.generations, offspring=args.offspring)
    config = bench_preset(schedule, args.fraction)
    model, tokenizer = load_model(args.model)
    data = prepare_data(config, tokenizer)
    database = build_database(model, data.calibration_ids, str(data_home() / "databases"),
                              calibration_digest=data.calibration_digest, config=config.database, progress=True)
    teacher = compute_teacher(model, data.fitness_ids, config.teacher_top_k)
    assembly = LiveAssembly(model, database)
    start = time.perf_counter()
    search = Search(assembly, teacher, data.train_ids, method_config("oneshot", config.search, args.seed, 0),
                    progress=True)
    result = tuple(search.run().parent)
    search_s = time.perf_counter() - start

    def held_out(levels) -> dict[str, torch.Tensor]:
        assembly.apply(Genome(levels, database.digest).assignment(), rebuild=True)
        return {TEXTS[name]: window_nlls(model, windows) for name, windows in data.eval_windows.items()}

    def ppl(nlls: dict[str, torch.Tensor]) -> dict[str, float]:
        return {f"ppl_{text}": math.exp(values.mean().item()) for text, values in nlls.items()}

    start = time.perf_counter()
    # in level order, as the search measures a stage: consecutive neighbours then share the longest run of
    # unchanged blocks, which the search's prefix reuse does not recompute (same KL either way)
    moves = sorted(swaps(result, search.budget), key=lambda move: swapped(result, move))
    screen = teacher.rows(torch.arange(config.search.fixed_rows, config.search.fixed_rows + args.screen_rows))
    result_kl = search.evaluate(result, screen, None)
    screened = []
    for index, move in enumerate(moves):
        screened.append((search.evaluate(swapped(result, move), screen, None) - result_kl, move))
        if index % 100 == 0:
            print(f"screened {index} of {len(moves)} neighbours ({time.perf_counter() - start:.0f} s)", flush=True)
    screened.sort()
    names = [f"{layer}.{kind}" for layer, kind in module_keys(database)]
    result_nlls, uniform_nlls = held_out(result), held_out(search.budget.uniform())
    confirmed, confirmed_moves = [], []
    for screen_delta, move in screened[: args.confirm]:
        nlls = held_out(swapped(result, move))
        row = {"raised": names[move[0]], "lowered": names[move[1]], "screen_kl_minus_result": screen_delta,
               **ppl(nlls)}
        for text, values in nlls.items():  # paired per window: windows differ far more than neighbours do
            row[f"nll_minus_result_{text}"] = (values - result_nlls[text]).mean().item()
            row[f"z_{text}"] = paired_z(values.tolist(), result_nlls[text].tolist())
        confirmed.append(row)
        confirmed_moves.append(move)
        print(f"{row['raised']:>8} +1 {row['lowered']:>8} -1  screen {screen_delta:+.4f}  "
              f"z SOTU {row['z_sotu']:+.2f}  z Moby {row['z_moby']:+.2f}", flush=True)
    better = [row for row in confirmed if row["z_sotu"] < -2 and row["z_moby"] < -2]
    best = min(confirmed, key=lambda row: row["nll_minus_result_sotu"] + row["nll_minus_result_moby"])
    uniform_ppl, result_ppl = ppl(uniform_nlls), ppl(result_nlls)
    both = sorted((row["z_sotu"] + row["z_moby"], move) for row, move in zip(confirmed, confirmed_moves)
                  if row["z_sotu"] < 0 and row["z_moby"] < 0)
    combinations = {}
    for name, moves_in_order in (("combined", [move for _, move in both]),
                                 ("combined_by_screen", [move for _, move in screened[: args.confirm]])):
        combination, applied = combined(result, moves_in_order, search.budget)
        nlls = held_out(combination)
        row = {"swaps": [{"raised": names[raised], "lowered": names[lowered]} for raised, lowered in applied],
               **ppl(nlls)}
        for text, values in nlls.items():
            row[f"z_{text}"] = paired_z(values.tolist(), result_nlls[text].tolist())
            row[f"ratio_to_uniform_{text}"] = row[f"ppl_{text}"] / uniform_ppl[f"ppl_{text}"]
        combinations[name] = row
        print(f"{name}: {len(applied)} disjoint swaps, SOTU {row['ppl_sotu']:.2f}, Moby {row['ppl_moby']:.2f} "
              f"(result {result_ppl['ppl_sotu']:.2f}, {result_ppl['ppl_moby']:.2f})", flush=True)
    results = {
        "model": args.model, "fraction_removed": args.fraction, "search_seed": args.seed,
        "search_generations": args.generations, "search_s": search_s, "neighbourhood_s": time.perf_counter() - start,
        "neighbours": len(moves), "screen_tokens": int(screen.tokens),
        "screened_better_than_result": sum(delta < 0 for delta, _ in screened),
        "confirmed_better_on_both_2se": len(better),
        "confirmed_better_on_either_2se": sum(row["z_sotu"] < -2 or row["z_moby"] < -2 for row in confirmed),
        "uniform": uniform_ppl, "result": result_ppl, "best_neighbour": best,
        "result_ratio_to_uniform": {text: result_ppl[f"ppl_{text}"] / uniform_ppl[f"ppl_{text}"] for text in
                                    TEXTS.values()},
        "best_neighbour_ratio_to_uniform": {text: best[f"ppl_{text}"] / uniform_ppl[f"ppl_{text}"] for text in
                                            TEXTS.values()},
        **combinations,
        "confirmed": confirmed,
    }
    write_results("neighbourhood", results, origin=origin)


if __name__ == "__main__":
    main()
