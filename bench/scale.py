"""Scale benchmark on SmolLM2: serial vs 2-worker Dask generations, a latency budget's predicted vs measured
speedup, and the search's prefix reuse against full forward passes.

    python -m bench.scale [--generations 4] [--latency-generations 8] [--prefix-generations 4]

Writes bench/results/scale.json: dask_generation_speedup (median serial generation time ÷ median 2-worker
generation time, same config and seed, so the same candidates), latency_budget_speedup_predicted (from the
stored per-module latency table) and latency_budget_speedup_measured (prefill of the dense vs the searched
model, interleaved, medians), prefix_reuse_speedup (the smollm2-demo search's wall time with full forward
passes ÷ with the prefix reuse, medians of two runs each; prefix_reuse_same_search: both end identically).
Gemma-3-270M's rows are their own results file (`make bench-gemma`), not merged here.
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.results_file import RESULTS_DIR, provenance, write_partial, write_results
from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds
from darwinlm.flows.offline import apply_offline_defaults


def _demo_setup(generations: int):
    from darwinlm.core.config import load_preset
    from darwinlm.core.database.store import build_database
    from darwinlm.core.home import data_home
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.data.prepared import prepare_data

    config = load_preset("smollm2-demo", {"search": {"generations": generations}})
    model, tokenizer = load_model("smollm2")
    data = prepare_data(config.data, tokenizer)
    database = build_database(model, data.calibration_ids, str(data_home() / "databases"),
                              calibration_digest=data.calibration_digest, config=config.database, progress=True)
    return config, model, data, database


def dask_generations(generations: int) -> dict:
    """The search subflow on the same config twice: evaluations in the flow process, then on 2 Dask workers."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    from darwinlm.flows.compress import CompressParameters, dask_runner, search_flow
    from darwinlm.tasks.tracking import Tracker

    config, _, _, database = _demo_setup(generations)
    values = json.loads(json.dumps(config.to_dict()))
    database_ref = {"uri": database.root, "digest": database.digest}
    times, parents, stages = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="darwinlm-scale-") as folder, prefect_test_harness(server_startup_timeout=120):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        tracker = Tracker()
        for mode in ("serial", "dask"):
            run_uri = str(Path(folder) / mode)
            search = search_flow
            if mode == "dask":
                search = search_flow.with_options(task_runner=dask_runner(CompressParameters(dask_workers=2)))
            flow_state = search(values, run_uri, database_ref, tracker.start(mode), distributed=mode == "dask",
                                return_state=True)
            state = json.loads((Path(run_uri) / "search_state.json").read_text())
            times[mode] = [record["wall_s"] for record in state["history"]]
            parents[mode] = state["parent"]
            stages[mode] = _stage_seconds(flow_state.state_details.flow_run_id)
            print(f"{mode}: generation seconds {[round(t, 1) for t in times[mode]]}", flush=True)
    return {"dask_generation_speedup": statistics.median(times["serial"]) / statistics.median(times["dask"]),
            "dask_generation_s": {mode: statistics.median(t) for mode, t in times.items()},
            "dask_first_generation_s": {mode: t[0] for mode, t in times.items()},
            "dask_stage_s": stages,
            "dask_same_genome": parents["serial"] == parents["dask"], "dask_generations": generations}


def _stage_seconds(flow_run_id) -> dict:
    """Where a search's time went, from Prefect's task runs, after the first generation (workers loading):
    per selection stage, the median seconds of the stage task and, when candidates were tasks of their own,
    of one candidate. A stage's time minus its candidates' (rounds × candidate) is the orchestration's share."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    spans: dict[str, list[float]] = {}
    for run in asyncio.run(task_runs()):
        kind, generation, stage = (run.name.split("-") + ["", "", ""])[:3]
        if kind in ("select", "candidate") and generation != "g1" and run.start_time and run.end_time:
            spans.setdefault(f"{kind}_{stage}", []).append((run.end_time - run.start_time).total_seconds())
    return {key: statistics.median(values) for key, values in sorted(spans.items())}


def latency_budget(generations: int, fraction: float) -> dict:
    """One-shot search under a latency budget; the table's predicted prefill speedup vs the measured one."""
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.latency import load_or_measure, predicted_speedup
    from darwinlm.core.search.evolution import Search, StageConfig

    config, model, data, database = _demo_setup(generations)
    assembly = LiveAssembly(model, database)
    seq_len = config.data.seq_len
    table = load_or_measure(assembly, batch=1, seq_len=seq_len, progress=True)
    search_config = replace(config.search, budget_kind="latency", fraction_removed=fraction, batch_size=1,
                            stages=tuple(StageConfig(s.survivors, s.fitness_tokens, 0) for s in config.search.stages))
    teacher = compute_teacher(model, data.teacher_pool_ids, config.teacher_top_k)
    search = Search(assembly, teacher, data.train_ids, search_config, progress=True)
    levels = search.genome(search.run()).assignment()
    predicted = predicted_speedup(table, levels)
    ids = data.eval_windows("test")[data.split.in_domain][:1]
    assignments = {"dense": {key: 0 for key in levels}, "pruned": levels}
    with torch.no_grad():  # each swap is followed by an untimed warm-up forward
        seconds = interleaved_medians(
            {name: (lambda: timed_seconds(lambda: model(ids, use_cache=False))) for name in assignments}, 7,
            prepare={name: (lambda a=a: (assembly.apply(a, rebuild=True), model(ids, use_cache=False)))
                     for name, a in assignments.items()}, warmup=False)
    measured = seconds["dense"] / seconds["pruned"]
    return {"latency_budget_speedup_predicted": predicted, "latency_budget_speedup_measured": measured,
            "latency_budget_fraction_removed": fraction, "latency_table_device": table["device"],
            "latency_kept_params_fraction": assembly.kept_params() / database.manifest["dense_params"]}


def prefix_reuse(generations: int) -> dict:
    """The smollm2-demo search (informed start included) for `generations` generations, with its prefix reuse
    and with full forward passes only, twice each in the order full, reuse, reuse, full (so warm-up and drift
    fall on both): median wall times, whether both ended on the same parent with the same history, and the
    share of block runs the reuse kept."""
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.search.evolution import Search
    from darwinlm.core.search.fitness import compute_teacher

    config, model, data, database = _demo_setup(generations)
    teacher = compute_teacher(model, data.teacher_pool_ids, config.teacher_top_k)
    walls, outcomes, kept = {"full": [], "reuse": []}, {}, []
    assembly = LiveAssembly(model, database)  # one for all four: a search leaves the model pruned
    for mode in ("full", "reuse", "reuse", "full"):
        search = Search(assembly, teacher, data.train_ids, config.search, progress=True)
        if mode == "full":
            search.prefix.verified = False  # every measurement a full forward pass
        start = time.perf_counter()
        state = search.run()
        walls[mode].append(time.perf_counter() - start)
        outcomes.setdefault(mode, (state.parent, [(h["best_fitness"], h["fixed_kl"]) for h in state.history]))
        if mode == "reuse":
            kept.append(search.prefix.reused_blocks / (search.prefix.reused_blocks + search.prefix.run_blocks))
        print(f"prefix reuse: {mode} search {walls[mode][-1]:.1f} s", flush=True)
    return {"prefix_reuse_speedup": statistics.median(walls["full"]) / statistics.median(walls["reuse"]),
            "prefix_reuse_search_s": {mode: statistics.median(values) for mode, values in walls.items()},
            "prefix_reuse_same_search": outcomes["full"] == outcomes["reuse"],
            "prefix_reuse_blocks_kept_fraction": kept[0], "prefix_reuse_generations": generations}


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=4, help="generations per Dask/serial run")
    parser.add_argument("--latency-generations", type=int, default=8)
    parser.add_argument("--latency-fraction", type=float, default=0.5, help="share of module latency removed")
    parser.add_argument("--prefix-generations", type=int, default=4,
                        help="generations of each of the four searches timing the prefix reuse")
    args = parser.parse_args()
    origin = provenance(config=vars(args), seeds=[0])
    results = {}
    results.update(latency_budget(args.latency_generations, args.latency_fraction))
    write_partial("scale", results)
    results.update(prefix_reuse(args.prefix_generations))
    write_partial("scale", results)
    results.update(dask_generations(args.generations))
    write_results("scale", results, goals={"dask_same_genome": "True", "prefix_reuse_same_search": "True"},
                  origin=origin)


if __name__ == "__main__":
    main()
