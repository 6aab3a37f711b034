"""Export benchmark on SmolLM2: a ~50% uniformly pruned model exported compact, reloaded, sized and timed.

    python -m bench.export [--rows 64] [--reps 5] [--threads 1,2] [--live]

Builds (or reuses: it is content-addressed) the database under `data_home()/databases`, prunes ~50% of every
module's units, exports dense and pruned compact folders, reloads the pruned one with a plain
`AutoModelForCausalLM.from_pretrained`, and prints a table; writes bench/results/export.json.
Speeds are ratios only: the reloaded export and a freshly loaded dense model are timed in turn, repetition by
repetition (the order rotating), and each side's median is taken, so drift on a shared machine cancels.
Prefill and decode are timed at 1 thread and at 2 (`prefill_speedup_N_threads`, `decode_speedup_N_threads`;
the unsuffixed keys are the largest count). On a shared 2-core machine a 2-thread OpenMP region waits for a
descheduled thread (~4 ms a time slice), which can swamp batch-1 decoding: the 1-thread figures are the steadier.
"""

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.database import calibration_rows, uniform_levels
from bench.results_file import provenance, write_results
from darwinlm.core.evaluation.timing import interleaved_medians
from darwinlm.flows.offline import apply_offline_defaults

GOALS = {"reload_max_abs_logit_diff": "≤ 1e-4", "prefill_speedup": "≥ 1.4", "size_ratio": "≤ 0.62"}


def _folder_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _await_other_builder(root: Path, quiet_s: float = 180.0, poll_s: float = 30.0) -> None:
    """If another process is writing this database (files changed in the last `quiet_s`), wait for its manifest
    instead of racing it; a folder that went quiet is a crashed build, which build_database resumes."""
    while root.is_dir() and not (root / "manifest.json").exists():
        newest = max((f.stat().st_mtime for f in root.rglob("*") if f.is_file()), default=0.0)
        if time.time() - newest > quiet_s:
            return
        print(f"another process is building {root}; waiting for its manifest", flush=True)
        time.sleep(poll_s)


@torch.no_grad()
def _prefill_tokens_per_s(model, ids: torch.Tensor) -> float:
    """One forward of ids (batch, seq_len) int64 without cache; tokens per second."""
    start = time.perf_counter()
    model(ids, use_cache=False)
    return ids.numel() / (time.perf_counter() - start)


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of prompt (1, prompt_len) int64 of exactly `new_tokens` tokens (EOS disabled)."""
    model.generation_config.eos_token_id = None
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)


def _decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = _generate(model, prompt, new_tokens)
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return new_tokens / (time.perf_counter() - start)


def _interleaved(models: dict, measure, reps: int, label: str) -> dict[str, float]:
    """Median of `measure(model)` per model, alternating models every repetition (rotated order)."""
    def progress(rep: int, latest: dict) -> None:
        print(f"{label} rep {rep + 1}/{reps}: " + " ".join(f"{n}={v:.1f} tok/s" for n, v in latest.items()), flush=True)

    return interleaved_medians({name: (lambda model=model: measure(model)) for name, model in models.items()}, reps,
                               warmup=False, on_repeat=progress)


@torch.no_grad()
def _profile(model, ids: torch.Tensor) -> dict[str, float]:
    """Seconds of one prefill forward (Llama-family layout) in attention, MLP, lm_head and the rest (hooks)."""
    # Walked by name, not arch_for: the registry knows base families, not the exported darwinlm_* model types.
    spent, starts = defaultdict(float), {}
    parts = [(kind, m) for block in model.model.layers
             for kind, m in (("attention", block.self_attn), ("mlp", block.mlp))]
    parts.append(("lm_head", model.get_output_embeddings()))
    handles = []
    for kind, module in parts:
        handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - starts[id(m)])))
    try:
        start = time.perf_counter()
        model(ids, use_cache=False)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return {**spent, "other": total - sum(spent.values()), "total": total}


def build_database_timed(model, tokenizer, split, rows: int, digest: str):
    """The uniform-50% benchmarks' database of `model`, and the seconds build_database took (a cached one opens in ms)."""
    from darwinlm.core.database.store import DatabaseConfig, build_database, database_root
    from darwinlm.core.home import data_home

    ids, calibration_digest = calibration_rows(split, tokenizer, rows, 512)
    base_uri, config = str(data_home() / "databases"), DatabaseConfig(storage_dtype="float16")
    _await_other_builder(Path(database_root(base_uri, digest, calibration_digest, config)))
    start = time.perf_counter()
    database = build_database(model, ids, base_uri, calibration_digest=calibration_digest, config=config,
                              base_model_digest=digest, progress=True)
    return database, time.perf_counter() - start


def _export_pruned(model, tokenizer, database, digest: str):
    """Export dense, apply ~50% uniformly, export pruned, reload it: (assembly, size ratio, reloaded model)."""
    from transformers import AutoModelForCausalLM

    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.export.huggingface import export_model

    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        dense_dir, pruned_dir = f"{scratch}/dense", f"{scratch}/pruned"
        export_model(model, tokenizer, dense_dir, export_format="compact", dtype="float32")
        assembly = LiveAssembly(model, database, base_model_digest=digest)
        assembly.apply(uniform_levels(database, 0.5))
        export_model(model, tokenizer, pruned_dir, export_format="compact", dtype="float32")
        size_ratio = _folder_bytes(pruned_dir) / _folder_bytes(dense_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    return assembly, size_ratio, reloaded


@torch.no_grad()
def _reload_checks(live, reloaded, windows: torch.Tensor, prompt: torch.Tensor) -> tuple[float, bool]:
    """Max |logit difference| on windows (n, seq_len), and whether 32 greedy tokens after prompt agree."""
    difference = (live(windows, use_cache=False).logits - reloaded(windows, use_cache=False).logits).abs().max()
    return difference.item(), torch.equal(_generate(live, prompt, 32), _generate(reloaded, prompt, 32))


def _speeds(models: dict, prefill_ids: torch.Tensor, prompt: torch.Tensor, reps: int, new_tokens: int) -> dict:
    """Interleaved prefill and decode medians (tokens/s) per model, and a prefill profile of dense and pruned."""
    for model in models.values():  # first calls allocate and pick kernels: keep them out of the timings
        _prefill_tokens_per_s(model, prefill_ids[:1])
        _generate(model, prompt, 4)
    load_before = os.getloadavg()[0]
    prefill = _interleaved(models, lambda m: _prefill_tokens_per_s(m, prefill_ids), reps, "prefill")
    decode = _interleaved(models, lambda m: _decode_tokens_per_s(m, prompt, new_tokens), reps, "decode")
    profile = {name: _profile(models[name], prefill_ids) for name in ("dense", "pruned")}
    return {"prefill": prefill, "decode": decode, "profile": profile, "load": [load_before, os.getloadavg()[0]]}


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="calibration rows of 512 tokens")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model (median)")
    parser.add_argument("--reload-windows", type=int, default=2, help="512-token windows for the reload check")
    parser.add_argument("--prefill-batch", type=int, default=4, help="rows of 512 tokens per prefill forward")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per generate call")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time at, comma-separated")
    parser.add_argument("--live", action="store_true", help="also time the in-memory LiveAssembly model")
    return parser.parse_args()


def main() -> None:
    apply_offline_defaults()
    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.data.tokens import tokenize_blocks
    from darwinlm.core.database.store import model_digest
    from darwinlm.core.model.loading import load_model

    args, run_start = _arguments(), time.perf_counter()
    origin = provenance(config=vars(args), seeds={"calibration_sample": 0})
    model, tokenizer = load_model("smollm2")
    split, digest = default_split(), model_digest(model)
    windows = tokenize_blocks(split.evaluation[split.in_domain], tokenizer, 512,
                              max_blocks=max(args.reload_windows, args.prefill_batch))
    prompt = windows[:1, :16]
    database, build_s = build_database_timed(model, tokenizer, split, args.rows, digest)
    dense_total = sum(p.numel() for p in model.parameters())  # tied embedding counted once, as lm_head
    assembly, size_ratio, reloaded = _export_pruned(model, tokenizer, database, digest)
    reload_diff, generate_match = _reload_checks(model, reloaded, windows[: args.reload_windows], prompt)
    pruned_total = sum(p.numel() for p in reloaded.parameters())

    dense, _ = load_model("smollm2")
    models = {"dense": dense, "pruned": reloaded, **({"live": model} if args.live else {})}
    by_threads = {}
    for threads in [int(count) for count in args.threads.split(",")]:  # serving runs at 1 thread and at all cores
        torch.set_num_threads(threads)
        by_threads[threads] = _speeds(models, windows[: args.prefill_batch], prompt, args.reps, args.new_tokens)
    speed = by_threads[max(by_threads)]
    prefill, decode = speed["prefill"], speed["decode"]
    results = {
        "model": "SmolLM2-135M-Instruct", "torch_threads": sorted(by_threads), "reps": args.reps,
        "database": database.digest, "database_build_s": build_s,
        "reload_max_abs_logit_diff": reload_diff, "reload_generate_tokens_match": generate_match,
        "prefill_speedup": prefill["pruned"] / prefill["dense"],
        "decode_speedup": decode["pruned"] / decode["dense"],
        "size_ratio": size_ratio,
        "kept_block_fraction": assembly.kept_params() / database.manifest["dense_params"],
        "prefill_speedup_ideal": dense_total / pruned_total,
        "size_ratio_ideal": pruned_total / dense_total,
        **({"prefill_speedup_live": prefill["live"] / prefill["dense"],
            "decode_speedup_live": decode["live"] / decode["dense"]} if args.live else {}),
        "dense_total_params": dense_total, "pruned_total_params": pruned_total,
        **{f"prefill_tokens_per_s_{name}": value for name, value in prefill.items()},
        **{f"decode_tokens_per_s_{name}": value for name, value in decode.items()},
        **{f"prefill_speedup_{threads}_threads": s["prefill"]["pruned"] / s["prefill"]["dense"]
           for threads, s in by_threads.items()},
        **{f"decode_speedup_{threads}_threads": s["decode"]["pruned"] / s["decode"]["dense"]
           for threads, s in by_threads.items()},
        "prefill_profile_s": speed["profile"], "load_average_during_timing": speed["load"],
        "run_s": time.perf_counter() - run_start,
    }
    _write(results, origin)


def _write(results: dict, origin: dict) -> None:
    """The table with goals, the prefill profile as shares per model, and bench/results/export.json."""
    write_results("export", results, GOALS, origin=origin)
    for name, parts in results.get("prefill_profile_s", {}).items():
        shares = " ".join(f"{part}={s / parts['total']:.0%}" for part, s in parts.items() if part != "total")
        print(f"prefill profile {name}: {parts['total']:.3g} s  {shares}")


if __name__ == "__main__":
    main()
