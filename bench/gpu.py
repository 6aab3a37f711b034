"""The GPU check at full model size: a short `paper`-preset search of SmolLM2-135M on a CUDA device.

    python -m bench.gpu [--model DIR] [--generations 2]

tests/test_gpu.py proves the CUDA path on a tiny model; this runs the real one with the published schedule (16
offspring, 4 stages, 1k–8k fitness tokens and 10k–200k finetune tokens per candidate, 4096-token rows, bf16) for
a few generations, and reports what a GPU user needs to plan a run: the database build against the calibration
forward passes alone (a ratio, measured in the same run), seconds per search generation and the share of them
spent outside forward/backward passes (assembling candidates), peak GPU memory, and held-out perplexity of
dense, uniform and the short search.

The row counts are cut from the preset's (256 calibration rows, 2048 post-training rows, ...) so that the run
fits the default text, which gives about 700 rows of 4096 tokens, and a few minutes of GPU time; the resolved
config is in the provenance. Post-training is not run: its cost is the finetune cost the search already shows.
"""

import argparse
import tempfile
import time

import torch

from bench.results_file import provenance, write_results
from darwinlm.core.evaluation.timing import timed_seconds
from darwinlm.flows.offline import apply_offline_defaults


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="HF folder or the smollm2 alias (default)")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--calibration-rows", type=int, default=64, help="rows of 4096 tokens for the database")
    parser.add_argument("--fitness-rows", type=int, default=16)
    parser.add_argument("--train-rows", type=int, default=64, help="the pool finetunes inside selection draw from")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 4096 tokens per text")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    apply_offline_defaults()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.gpu needs a CUDA GPU (tests/test_gpu.py covers the device code on any machine)")
    from darwinlm.core.compression import build_search, selection_teacher
    from darwinlm.core.config import load_preset
    from darwinlm.core.database.store import build_database
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.model.loading import load_model, resolve_device, resolve_dtype
    from darwinlm.core.data.prepared import prepare_data
    from darwinlm.core.evaluation.held_out import evaluate
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.genome import Genome

    config = load_preset("paper", {"model": args.model, "search": {"generations": args.generations}, "data": {
        "calibration_rows": args.calibration_rows, "teacher_pool_rows": args.teacher_pool_rows, "train_rows": args.train_rows,
        "post_train_rows": 0, "eval_windows": args.eval_windows}})
    origin = provenance(config=config.to_dict(), seeds=[config.search.seed])
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_model(config.model, dtype, device)
    data = prepare_data(config.data, tokenizer)
    results = {"gpu": torch.cuda.get_device_name(), "dtype": dtype, "seq_len": config.data.seq_len,
               "calibration_tokens": int(data.calibration_ids.numel())}

    @torch.no_grad()
    def calibration_forward():
        for row in range(0, data.calibration_ids.shape[0], 8):  # build_database's batch size
            model(data.calibration_ids[row : row + 8].to(device), use_cache=False)

    calibration_forward()  # first calls pick kernels; the floor is a warm pass
    results["calibration_forward_s"] = timed_seconds(calibration_forward, device)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        database = build_database(model, data.calibration_ids, root, calibration_digest=data.calibration_digest,
                                  config=config.database, progress=True)
        torch.cuda.synchronize()
        results["database_build_s"] = time.perf_counter() - start
        results["build_time_ratio_vs_forward"] = results["database_build_s"] / results["calibration_forward_s"]

        start = time.perf_counter()
        teacher = compute_teacher(model, data.teacher_pool_ids, config.teacher_top_k)
        results["fitness_teacher_s"] = time.perf_counter() - start
        start = time.perf_counter()
        selection = selection_teacher(config, model, tokenizer, data, progress=True)  # the rows the model writes
        results["generated_selection_s"] = time.perf_counter() - start
        results["dense"] = evaluate(model, data, None)
        assembly = LiveAssembly(model, database)
        search = build_search(config, assembly, data, teacher, selection, progress=True)
        uniform = Genome(search.budget.uniform(), database.digest)
        assembly.apply(uniform.assignment(), rebuild=True)
        results["uniform"] = evaluate(model, data, None)
        assembly.apply({key: 0 for key in uniform.assignment()}, rebuild=True)

        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        state = search.run()
        results["search_s"] = time.perf_counter() - start
        results["search_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results["generations"] = [{key: record[key] for key in ("generation", "wall_s", "compute_s", "fixed_kl",
                                                                "accepted", "paired_z") if key in record}
                                  for record in state.history]
        results["seconds_per_generation"] = sum(r["wall_s"] for r in state.history) / max(len(state.history), 1)
        results["search_overhead_fraction"] = 1 - sum(r["compute_s"] for r in state.history) / max(
            sum(r["wall_s"] for r in state.history), 1e-9)
        results["start"] = state.start
        assembly.apply(search.genome(state).assignment(), rebuild=True)
        results["searched"] = evaluate(model, data, None)
        results["searched_ppl_ratio_vs_uniform"] = {
            name: results["searched"][f"ppl_{name}"] / results["uniform"][f"ppl_{name}"] for name in data.held_out}
    write_results("gpu", results, {"build_time_ratio_vs_forward": "≤ 1.5 (as on the CPU)"}, origin=origin)


if __name__ == "__main__":
    main()
