"""Search benchmark on SmolLM2: uniform, the informed start, one-shot and training-aware search over seeds, and
torch-pruning peers, each before and after the same post-training, on the same held-out windows.

    python -m bench.search [--targets 0.5,0.3] [--seeds 0,1,2] [--methods oneshot,trainaware,oneshot_matched]
                           [--match trainaware] [--generations G] [--offspring K] [--informed-every K]
                           [--confirm-tokens N] [--accept-z Z] [--surrogate-screen K] [--kl-skip-tokens N]
                           [--task-limit 0] [--skip-peer] [--skip-post-train]

Writes bench/results/search.json by itself when every target is done, with provenance (rows so far are kept in
bench_partial, see bench.results_file.partial_path, so a stopped run changes no results file). `--results NAME`
writes bench/results/NAME.json instead. Rerun with the same arguments after a stop, it keeps the rows the stopped
run had measured if the code that measures them (MEASURED_BY) is unchanged since; the results file then records
that run's provenance as `resumed_rows_provenance`. Every method gets the smollm2-demo preset's data: the same
calibration rows (the database's, and the peers'), the same held-out windows, the same post-training rows and
schedule. A searched method's row holds the seed mean and `seeds`, its per-seed rows; `gap_closed_*` is the share
of the uniform-to-dense gap in log-perplexity a method closes; `within_noise_*` says whether its ppl is within
twice the noise of uniform's (uniform post-trained for a post-trained row), counting window standard errors and the
spread over seeds. `wall_s` is a method's own work; the database build and the fitness teacher, shared by every
darwinlm method of a target, are under `shared_s` (the database only when built by this run). `decision_noise`
measures how many fitness rows one accept/reject decision needs (paired KL differences). Training-aware selection
finetunes every candidate on `--trainaware-tokens` tokens at each stage; `oneshot_matched` is plain one-shot search
(no informed steps, no confirmation, the preset's `accept_z`) given, per seed, the wall time the `--match` method's
search took (so more generations): the comparison at matched compute, against training-aware search (the default)
or against one-shot search with `--informed-every` steps, `--confirm-tokens` or another `--accept-z`
(`--match oneshot`). The schedule (generations, offspring, fitness rows) defaults to the smollm2-demo preset's.
"""

import argparse
import math
import statistics
import time
from dataclasses import replace

import torch

from bench.results_file import provenance, resumable_partial, write_partial, write_results
from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds
from darwinlm.flows.offline import apply_offline_defaults

METRICS = ("ppl_sotu", "ppl_moby", "kl", "zeroshot_acc", "params")
# What a row's figures depend on besides the arguments: a stopped run's rows are kept only if these are unchanged.
MEASURED_BY = ("darwinlm_core", "tasks", "flows", "requirements", "bench/search.py", "bench/peer_torch_pruning.py")
# search settings an argument may set, else the preset's (a namespace without them, like bench.neighbourhood's, keeps
# the preset's)
SEARCH_KNOBS = ("informed_every", "confirm_tokens", "accept_z", "surrogate_screen", "kl_skip_tokens")
SEARCH_METHODS = {"oneshot": "darwinlm_oneshot", "trainaware": "darwinlm_trainaware",
                  "oneshot_matched": "darwinlm_oneshot_matched"}


def method_config(method: str, search, seed: int, trainaware_tokens: int):
    """The preset's search for one method and seed: training-aware finetunes each candidate on
    `trainaware_tokens` tokens at every stage (the preset's finetune lr and batch), one-shot on none. The matched
    one-shot is the plain search, without informed steps or confirmation and with the preset's acceptance
    margin, whatever its reference ran."""
    from darwinlm.core.config import load_preset
    from darwinlm.core.search.evolution import StageConfig

    tokens = trainaware_tokens if method == "trainaware" else 0
    if method == "oneshot_matched":  # every knob an argument may set goes back to the preset's
        preset = load_preset("smollm2-demo").search
        search = replace(search, **{knob: getattr(preset, knob) for knob in SEARCH_KNOBS})
    return replace(search, seed=seed,
                   stages=tuple(StageConfig(stage.survivors, stage.fitness_tokens, tokens) for stage in search.stages))


def bench_preset(args, fraction: float):
    """The smollm2-demo preset with this bench's model, teacher pool, search schedule and evaluation."""
    from darwinlm.core.config import load_preset

    search = {"fraction_removed": fraction, "generations": args.generations, "offspring": args.offspring}
    search.update({knob: getattr(args, knob) for knob in SEARCH_KNOBS if getattr(args, knob, None) is not None})
    return load_preset("smollm2-demo", {
        "model": args.model, "data": {"fitness_rows": args.fitness_rows}, "search": search,
        "evaluate": {"task_limit": args.task_limit or None, "tasks": "local" if args.task_limit else ""}})


def run_for(search, seconds: float):
    """Run `search` generation by generation until `seconds` of wall time, its start included, have passed
    (the generation under way finishes): one-shot given what training-aware took, so compute is matched."""
    start = time.perf_counter()
    state = search.load_or_start()
    while time.perf_counter() - start < seconds:
        state = search.generation(state)
        print(f"oneshot_matched: generation {state.generation}, {time.perf_counter() - start:.0f} of "
              f"{seconds:.0f} s", flush=True)
    return state


def evaluate_row(model, data, teacher, tokenizer, config, params: int, wall_s: float) -> dict:
    from darwinlm.core.pipeline import evaluate
    from darwinlm.tasks.stages import zero_shot_scores

    scores = evaluate(model, data, teacher)
    row = {"params": params, "ppl_sotu": scores["ppl_in_domain"], "ppl_moby": scores.get("ppl_out_of_domain"),
           "ppl_sotu_se": scores["ppl_in_domain_se"], "ppl_moby_se": scores.get("ppl_out_of_domain_se"),
           "kl": scores["kl"], "wall_s": wall_s}
    row["zeroshot_acc"] = zero_shot_scores(model, tokenizer, data, config).get("zeroshot_acc")
    return row


def seed_mean(rows: list[dict]) -> dict:
    """The mean of each figure over seeds, with the spread (population sd) and the per-seed rows."""
    mean = {}
    for key in (*METRICS, "ppl_sotu_se", "ppl_moby_se", "wall_s"):
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            mean[key] = statistics.fmean(values)
            if len(values) > 1 and key not in ("params", "ppl_sotu_se", "ppl_moby_se"):
                mean[f"{key}_sd"] = statistics.pstdev(values)
    return {**mean, "seeds": rows}


def gap_closed(row: dict, uniform: dict, dense: dict) -> dict:
    """ln(ppl_uniform / ppl_method) / ln(ppl_uniform / ppl_dense) for each held-out text."""
    closed = {}
    for text in ("sotu", "moby"):
        key = f"ppl_{text}"
        if row.get(key) and uniform.get(key) and dense.get(key) and uniform[key] != dense[key]:
            closed[f"gap_closed_{text}"] = math.log(uniform[key] / row[key]) / math.log(uniform[key] / dense[key])
    return closed


def within_noise(row: dict, uniform: dict) -> dict:
    """`within_noise_<text>`: whether a held-out ppl differs from uniform's by less than twice the noise of the
    difference. The noise counts both rows' standard errors over windows and, for a mean over seeds, the
    standard error of that mean; taken as independent, which overstates it for two models on the same windows,
    so a difference marked outside the noise is one."""
    marks = {}
    for text in ("sotu", "moby"):
        key = f"ppl_{text}"
        if row.get(key) is None or uniform.get(key) is None:
            continue
        variance = sum((r.get(f"{key}_se") or 0.0) ** 2 + r.get(f"{key}_sd", 0.0) ** 2 / len(r.get("seeds") or [0])
                       for r in (row, uniform))
        marks[f"within_noise_{text}"] = abs(row[key] - uniform[key]) < 2 * math.sqrt(variance)
    return marks


def candidate_eval_speedup(assembly, teacher, levels) -> float:
    """Fitness-evaluation tokens/s at `levels` ÷ dense, interleaved three times, medians."""
    from darwinlm.core.search.fitness import kl_per_token

    assignments = {"dense": {key: 0 for key in levels}, "pruned": levels}
    seconds = interleaved_medians(
        {name: (lambda: timed_seconds(lambda: kl_per_token(assembly.model, teacher))) for name in assignments}, 3,
        prepare={name: (lambda a=a: assembly.apply(a, rebuild=True)) for name, a in assignments.items()}, warmup=False)
    return seconds["dense"] / seconds["pruned"]


def decision_noise(search, parent, rows: int = 12, children: int = 6) -> dict:
    """Per-row KL of `parent` and of some of its offspring on `rows` selection rows: a decision between two
    candidates rests on their paired per-row differences, whose mean/sd says how many rows a 2σ call needs."""
    import random

    from darwinlm.core.search.genome import offspring

    pool = search.teacher_pool
    indices = torch.arange(search.config.fixed_rows, search.config.fixed_rows + rows)
    genomes = [tuple(parent)] + offspring(tuple(parent), children, search.budget, random.Random(0))
    per_row = [search.evaluate_rows(g, pool.rows(indices), None) for g in genomes]
    needed, differences = [], []
    for child in per_row[1:]:
        diffs = [c - p for c, p in zip(child, per_row[0])]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        differences.append(abs(mean))
        needed.append((2 * sd / abs(mean)) ** 2 if mean else float("inf"))
    row_sd = statistics.fmean(statistics.stdev(r) for r in per_row)
    return {"rows": rows, "children": children, "mean_abs_child_minus_parent": statistics.fmean(differences),
            "kl_sd_across_rows": row_sd, "rows_for_2sigma_median": statistics.median(needed),
            "rows_for_2sigma": needed}


def run_target(fraction: float, args, rows: dict, save) -> None:
    """Fill `rows` (method → row) for one target, calling save() as rows arrive."""
    from darwinlm.core.model.assembly import LiveAssembly
    from darwinlm.core.database.store import DatabaseBuilder, build_database
    from darwinlm.core.database.refit import RefitDatabase, refit_genome
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.genome import Genome
    from darwinlm.core.home import data_home
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.pipeline import dense_eval_teacher, post_train, prepare_data
    from darwinlm.core.search.evolution import Search

    config = bench_preset(args, fraction)
    model, tokenizer = load_model(args.model)
    data = prepare_data(config, tokenizer)
    shared = rows.setdefault("shared_s", {})
    start = time.perf_counter()
    base_uri = str(data_home() / "databases")
    cached = DatabaseBuilder(model, data.calibration_ids, base_uri, calibration_digest=data.calibration_digest,
                             config=config.database).finished
    database = build_database(model, data.calibration_ids, base_uri, calibration_digest=data.calibration_digest,
                              config=config.database, progress=True)
    shared.setdefault("database", None if cached else time.perf_counter() - start)  # a resumed run's is cached
    start = time.perf_counter()
    fitness_teacher = compute_teacher(model, data.fitness_ids, config.teacher_top_k)
    shared.setdefault("fitness_teacher", time.perf_counter() - start)
    eval_teacher = dense_eval_teacher(model, data, config.teacher_top_k)
    post_teacher = None if args.skip_post_train else compute_teacher(model, data.post_train_ids, config.teacher_top_k)
    rows["calibration_tokens"] = int(data.calibration_ids.numel())
    dense_params = database.manifest["dense_params"]
    if "dense" not in rows:
        rows["dense"] = evaluate_row(model, data, eval_teacher, tokenizer, config, dense_params, 0.0)
        save()

    assembly = LiveAssembly(model, database)

    def measure(genome: Genome, wall: float) -> tuple[dict, dict | None]:
        """The genome as selected (database weights), then as the compress flow finishes it: refitted on
        propagated inputs as the preset says (post_train.refit, refit_dense_weight), then post-trained."""
        params = budget.cost(genome.levels)
        assembly.apply(genome.assignment(), rebuild=True)
        before = evaluate_row(model, data, eval_teacher, tokenizer, config, params, wall)
        if args.skip_post_train:
            return before, None
        start = time.perf_counter()
        if config.post_train.refit:
            assembly.apply({key: 0 for key in genome.assignment()}, rebuild=True)  # the refit starts dense
            assembly.database = RefitDatabase(database, refit_genome(
                model, database, genome.assignment(), data.calibration_ids,
                dense_weight=config.post_train.refit_dense_weight))
        try:
            post_train(assembly, genome, data.post_train_ids, config, teacher=post_teacher, progress=True)
            post_s = time.perf_counter() - start
            after = evaluate_row(model, data, eval_teacher, tokenizer, config, params, wall + post_s)
        finally:
            assembly.database = database
        return before, {**after, "refit": config.post_train.refit}

    def measured(name: str) -> bool:  # by this run, or by the stopped run it resumes
        return name in rows and (args.skip_post_train or f"{name}_posttrained" in rows)

    def record(name: str, before: dict, after: dict | None) -> None:
        rows[name] = before
        if after is not None:
            rows[f"{name}_posttrained"] = after
        save()

    search = Search(assembly, fitness_teacher, data.train_ids, replace(config.search, start="informed"))
    budget = search.budget
    informed = None
    if not (measured("informed_start") and "decision_noise" in rows):
        start = time.perf_counter()
        informed, _ = search.choose_start()
        informed_s = time.perf_counter() - start
    uniform = Genome(budget.uniform(), database.digest)
    if not measured("uniform"):
        record("uniform", *measure(uniform, 0.0))
    if informed is not None:
        record("informed_start", *measure(Genome(informed, database.digest), informed_s))
        rows["decision_noise"] = decision_noise(search, informed)
    if "candidate_eval_speedup" not in rows:
        rows["candidate_eval_speedup"] = candidate_eval_speedup(assembly, fitness_teacher.rows(torch.arange(4)),
                                                                uniform.assignment())
    save()

    matched_wall = {}  # seed → wall seconds of the --match method's search: the matched one-shot's budget
    for method in args.methods:
        name = SEARCH_METHODS[method]
        per_seed = rows.get(name, {}).get("seeds", []) if measured(name) else []  # seeds a stopped run measured
        per_seed_after = rows.get(f"{name}_posttrained", {}).get("seeds", []) if per_seed else []
        for seed in args.seeds:
            measured_seed = next((row for row in per_seed if row["seed"] == seed), None)
            if measured_seed is not None:
                if method == args.match:  # a search row's wall_s is its search's
                    matched_wall.setdefault(seed, measured_seed["wall_s"])
                continue
            search_config = method_config(method, config.search, seed, args.trainaware_tokens)
            start = time.perf_counter()
            search = Search(assembly, fitness_teacher, data.train_ids, search_config, progress=True)
            state = run_for(search, matched_wall[seed]) if method == "oneshot_matched" else search.run()
            wall = time.perf_counter() - start
            if method == args.match:
                matched_wall[seed] = wall
            before, after = measure(search.genome(state), wall)
            before.update(seed=seed, start=state.start, generations=state.generation,
                          finetune_tokens=[stage.finetune_tokens for stage in search_config.stages],
                          trajectory=[state.history[0]["previous_fixed_kl"]] + [h["fixed_kl"] for h in state.history],
                          accepted=sum(h["accepted"] for h in state.history),
                          paired_z=[h["paired_z"] for h in state.history],
                          informed_steps=[{"generation": h["generation"], **h["informed"]}
                                          for h in state.history if "informed" in h],
                          confirmations=[{"generation": h["generation"], **h["confirmation"]}
                                         for h in state.history if "confirmation" in h])
            per_seed.append(before)
            if after is not None:
                per_seed_after.append({**after, "seed": seed})
            record(name, seed_mean(per_seed), seed_mean(per_seed_after) if after else None)

    if not args.skip_peer:
        run_peers(args, config, data, fraction, eval_teacher, post_teacher, tokenizer, record, measured)
    for name, row in rows.items():
        if isinstance(row, dict) and "ppl_sotu" in row and name != "dense":
            row.update(gap_closed(row, rows["uniform"], rows["dense"]))
            if name != "uniform" and not name.startswith("uniform_"):
                comparison = rows.get("uniform_posttrained") if name.endswith("_posttrained") else rows["uniform"]
                row.update(within_noise(row, comparison or {}))
    save()


def run_peers(args, config, data, fraction, eval_teacher, post_teacher, tokenizer, record, measured) -> None:
    """torch-pruning's Taylor pruning (uniform and global), on the same calibration rows as the database, then
    the same post-training as darwinlm (finetune with distillation from the same teacher rows)."""
    from bench.peer_torch_pruning import prune_taylor
    from darwinlm.core.search.finetune import finetune
    from darwinlm.core.model.loading import load_model

    for scope, name in (("uniform", "tp_taylor_uniform"), ("global", "tp_global")):
        if measured(name):
            continue
        peer_model, _ = load_model(args.model)
        start = time.perf_counter()
        peer = prune_taylor(peer_model, data.calibration_ids, 1.0 - fraction, scope=scope)
        wall = time.perf_counter() - start
        before = evaluate_row(peer_model, data, eval_teacher, tokenizer, config, peer["kept_block_params"], wall)
        after = None
        if not args.skip_post_train:
            start = time.perf_counter()
            finetune(peer_model, data.post_train_ids, config.post_train.finetune, teacher=post_teacher, progress=True)
            after = evaluate_row(peer_model, data, eval_teacher, tokenizer, config, peer["kept_block_params"],
                                 wall + time.perf_counter() - start)
        record(name, before, after)
        del peer_model


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    from darwinlm.core.config import load_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.3", help="fractions of block parameters removed")
    parser.add_argument("--seeds", default="0,1,2", help="search seeds (the database is shared by all)")
    parser.add_argument("--methods", default="oneshot,trainaware", help="searches to run: oneshot, trainaware, "
                        "oneshot_matched (plain one-shot given each seed's wall time of the --match method, "
                        "listed before it)")
    parser.add_argument("--match", default="trainaware", choices=("trainaware", "oneshot"),
                        help="the method whose per-seed wall time oneshot_matched is given")
    parser.add_argument("--trainaware-tokens", type=int, default=1024, help="finetune tokens per candidate and "
                        "stage in training-aware selection (bench.trainaware's setting that ranked as well as "
                        "one-shot)")
    # the schedule defaults to make demo's own (the smollm2-demo preset), so a plain run measures what users get
    demo = load_preset("smollm2-demo")
    parser.add_argument("--generations", type=int, default=demo.search.generations)
    parser.add_argument("--offspring", type=int, default=demo.search.offspring)
    parser.add_argument("--informed-every", type=int, default=None, help="an informed step every this many "
                        "generations (0: none); default: the smollm2-demo preset's")
    parser.add_argument("--confirm-tokens", type=int, default=None, help="confirm each replacement of the parent "
                        "on this many more tokens (0: none); default: the smollm2-demo preset's")
    parser.add_argument("--accept-z", type=float, default=None, help="replace the parent only when a challenger "
                        "beats it by this many paired standard errors; default: the smollm2-demo preset's")
    parser.add_argument("--surrogate-screen", type=int, default=None, help="draw this many times the offspring "
                        "and keep those the slope-weighted errors predict best (1: none); default: the preset's")
    parser.add_argument("--kl-skip-tokens", type=int, default=None, help="leave the first N positions of every "
                        "selection row out of a candidate's KL; default: the smollm2-demo preset's")
    parser.add_argument("--fitness-rows", type=int, default=demo.data.fitness_rows, help="teacher pool: the "
                        "search's fixed rows + the rows it selects on")
    parser.add_argument("--task-limit", type=int, default=0, help="examples per offline zero-shot task; 0: skip")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-post-train", action="store_true")
    parser.add_argument("--model", default="smollm2", help="smollm2, or a folder (e.g. Gemma: see bench/gemma.py)")
    parser.add_argument("--results", default="search", help="results name: bench/results/NAME.json")
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    args.methods = [method for method in args.methods.split(",") if method]
    unknown = sorted(set(args.methods) - set(SEARCH_METHODS))
    if unknown:
        parser.error(f"unknown method {unknown[0]}: use {', '.join(SEARCH_METHODS)}")
    if "oneshot_matched" in args.methods and args.match not in args.methods[: args.methods.index("oneshot_matched")]:
        parser.error(f"oneshot_matched needs {args.match} before it in --methods (it is given {args.match}'s wall "
                     f"time; --match names another)")
    return args


def main() -> None:
    apply_offline_defaults()
    args = parse_arguments()
    origin = provenance(vars(args), args.seeds)
    run = {"config": origin["config"]}
    earlier = resumable_partial(args.results, run, MEASURED_BY)
    results = {"targets": earlier["targets"] if earlier else {}}
    first_origin = earlier["origin"] if earlier else origin

    def save() -> None:  # a long run keeps its rows as they arrive, outside bench/results
        write_partial(args.results, {**results, "run": run, "origin": first_origin})

    for fraction in [float(t) for t in args.targets.split(",")]:
        rows = results["targets"].setdefault(str(fraction), {})
        run_target(fraction, args, rows, save)
        _print(str(fraction), rows)
    resumed = {"resumed_rows_provenance": first_origin} if earlier else {}
    write_results(args.results, {**results, **resumed}, echo=False, origin=origin)


def _print(key: str, rows: dict) -> None:
    print(f"\ntarget: {float(key):.0%} of block parameters removed")
    print(f"{'method':<36}{'params':>12}{'ppl SOTU':>10}{'ppl Moby':>10}{'KL':>8}{'gap SOTU':>10}{'wall s':>8}")
    for name, row in rows.items():
        if isinstance(row, dict) and "ppl_sotu" in row:
            spread = f"±{row['ppl_sotu_sd']:.1f}" if "ppl_sotu_sd" in row else ""
            spread += "  (within noise of uniform)" if row.get("within_noise_sotu") else ""
            print(f"{name:<36}{row['params']:>12,.0f}{row['ppl_sotu']:>10.2f}{row['ppl_moby'] or 0:>10.2f}"
                  f"{row['kl']:>8.3f}{row.get('gap_closed_sotu', 0):>10.3f}{row['wall_s']:>8.0f} {spread}")


if __name__ == "__main__":
    main()
