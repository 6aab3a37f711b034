"""Database benchmark on SmolLM2: OBS quality against magnitude and torch-pruning, build speed, memory, size.

    python -m bench.database [--rows 64] [--windows 40] [--skip-peer]

Prints a table and writes bench/results/database.json, with provenance. Speeds are ratios measured in this one
run (the build against the calibration forward passes alone), because absolute seconds drift on a shared
machine; the load average around them is recorded. Also measured: the refit of the uniform-50% genome on
propagated inputs (darwinlm.core.database.refit), with the database's units and with units reselected; its
dense-weight curve (`--refit-weights`: ppl per weight on the validation windows of both held-out texts, which
choose the weight that every other refit here uses and `refit_dense_weight` records, on the first 16 calibration
rows, and on both texts' test windows); the GQA-cost-aware greedy order against the plain one
(DatabaseConfig.gqa_cost_aware: uniform-50% ppl of both, same rows, windows and parameter budget; the main
database uses the default order). The refit is measured on uniform 50% and on the genome of a short one-shot
search (`--search-generations`), on both held-out texts (SOTU and Moby-Dick: `*_moby` keys). The calibration curve
and the refit on more rows are a study: experiments/2026-12-01-database-studies.
torch-pruning gets the same calibration rows as OBS. Every held-out figure is on the test windows
(darwinlm.core.data.windows, recorded under `windows`); only the refit weight's choice reads validation windows.
"""

import argparse
import hashlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.results_file import provenance, write_results
from darwinlm.core.database.structure import scatter_units, unit_columns
from darwinlm.flows.offline import apply_offline_defaults



def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def calibration_rows(split, tokenizer, rows: int, seq_len: int):
    """`rows` calibration blocks of `seq_len` tokens sampled from the split, with their digest (shared by the
    database, export and GGUF benchmarks)."""
    from darwinlm.core.data.tokens import sample_blocks, tokenize_blocks

    blocks = tokenize_blocks(split.calibration, tokenizer, seq_len)
    ids = sample_blocks(blocks, rows, torch.Generator().manual_seed(0))
    digest = hashlib.sha256(split.digest.encode() + ids.numpy().tobytes()).hexdigest()
    return ids, digest


@torch.no_grad()
def _time_forward(model, ids, batch_size: int) -> float:
    start = time.perf_counter()
    for s in range(0, ids.shape[0], batch_size):
        model(ids[s : s + batch_size], use_cache=False)
    return time.perf_counter() - start


def _magnitude_kept(weight: torch.Tensor, n_units: int, unit_size: int, removed: int) -> torch.Tensor:
    """Units kept by magnitude pruning: drop the `removed` units with the smallest output-column norms."""
    norms = weight.reshape(weight.shape[0], n_units, unit_size).pow(2).sum((0, 2))
    return norms.argsort(descending=True)[: n_units - removed].sort().values


def error_ratios(model, ids, database, batch_size: int) -> list[float]:
    """OBS ÷ magnitude reconstruction error ‖WX − ŴX‖² for every layer, module and level strictly between ends."""
    from darwinlm.core.model.driver import BlockDriver
    from darwinlm.core.database.hessians import collect_block_hessians
    from darwinlm.core.database.obs import reconstruction_error

    driver, ratios = BlockDriver(model, ids, batch_size=batch_size), []
    for layer in range(driver.num_blocks):
        block = driver.blocks[layer]
        with collect_block_hessians(block, driver.spec) as accumulators:
            driver.advance()
        for kind, linear in (("attn", driver.spec.attention_of(block).o_proj), ("mlp", driver.spec.mlp_of(block).down_proj)):
            entry, hessian = database.module(layer, kind), accumulators[kind].hessian()
            dense = linear.weight.detach().float()
            n_units, unit_size = entry["n_units"], entry["unit_size"]
            for level in range(1, len(entry["levels"]) - 1):
                pruned = database.load(layer, kind, level)
                obs = scatter_units(pruned.weight.float(), pruned.kept_units, n_units, unit_size)
                kept = _magnitude_kept(dense, n_units, unit_size, pruned.units_removed)
                columns = unit_columns(kept, unit_size)
                # Same storage precision for both, so the ratio compares selection and update, not rounding.
                magnitude = scatter_units(dense[:, columns].half().float(), kept, n_units, unit_size)
                ratios.append(reconstruction_error(dense, obs, hessian) / reconstruction_error(dense, magnitude, hessian))
    return ratios


def uniform_levels(database, fraction_removed: float) -> dict:
    """Every module at (nearly) the same fraction removed, repaired to the exact parameter budget, so all
    methods compared keep the same number of parameters."""
    from darwinlm.core.search.genome import Budget, Genome

    levels = Budget.from_database(database, fraction_removed=fraction_removed).uniform()
    return Genome(levels, database.digest).assignment()


@torch.no_grad()
def _magnitude_model(model, database, levels) -> None:
    """Zero, in place, the output-projection columns of the units magnitude pruning removes at `levels`."""
    from darwinlm.core.model.arch import arch_for

    spec = arch_for(model)
    for (layer, kind), level in levels.items():
        block = spec.block_list(model)[layer]
        linear = spec.attention_of(block).o_proj if kind == "attn" else spec.mlp_of(block).down_proj
        entry = database.module(layer, kind)
        removed = entry["levels"][level]["units_removed"]
        kept = _magnitude_kept(linear.weight, entry["n_units"], entry["unit_size"], removed)
        mask = torch.zeros(entry["n_units"], dtype=torch.bool)
        mask[kept] = True
        linear.weight.mul_(mask.repeat_interleave(entry["unit_size"]).to(linear.weight.dtype))


def _refit_ppl(model, database, levels, ids, windows: dict, digest, batch_size: int,
               reselect: bool, dense_weight: float) -> tuple[dict, float]:
    """({text: held-out ppl} of the refitted genome, refit seconds): the dense model is refitted, assembled,
    measured on each text of `windows` and set back to dense."""
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.refit import RefitDatabase, refit_genome

    start = time.perf_counter()
    refit = refit_genome(model, database, levels, ids, batch_size=batch_size, reselect=reselect,
                         dense_weight=dense_weight, base_model_digest=digest)
    seconds = time.perf_counter() - start
    assembly = LiveAssembly(model, RefitDatabase(database, refit), base_model_digest=digest)
    assembly.apply(levels)
    ppl = held_out_ppl(model, windows, f"refit{' reselect' if reselect else ''} w={dense_weight}")
    assembly.apply({key: 0 for key in levels})
    return ppl, seconds


def held_out_ppl(model, windows: dict, desc: str) -> dict:
    """{text: perplexity} of the model as it stands on each text's windows."""
    from darwinlm.core.evaluation.metrics import perplexity

    return {text: perplexity(model, rows, progress=True, desc=f"ppl {desc} {text}") for text, rows in windows.items()}


def searched_levels(model, database, split, tokenizer, digest, generations: int) -> dict:
    """The genome a short one-shot search finds on this database: smollm2-demo's search settings (its informed
    start, stages and acceptance rule) with 6 offspring for `generations` generations, its fitness teacher on
    training-split rows, which neither the calibration rows nor the held-out windows come from. Leaves the
    model dense."""
    from dataclasses import replace

    from darwinlm.core.config import load_preset
    from darwinlm.core.data.tokens import tokenize_blocks
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.search.evolution import Search
    from darwinlm.core.search.fitness import compute_teacher

    preset = load_preset("smollm2-demo")
    rows = tokenize_blocks(split.training, tokenizer, 512, max_blocks=preset.data.teacher_pool_rows)
    teacher = compute_teacher(model, rows, preset.teacher_top_k)
    assembly = LiveAssembly(model, database, base_model_digest=digest)
    search = Search(assembly, teacher, rows, replace(preset.search, generations=generations, offspring=6),
                    progress=True)
    levels = search.genome(search.run()).assignment()
    assembly.apply({key: 0 for key in levels})
    return levels


def uniform50_ppl(model, ids, calibration_digest, eval_windows, digest, batch_size: int, root: str,
                  config, desc: str) -> tuple[float, float]:
    """(held-out uniform-50% ppl, build seconds) of a database built from `ids` with `config` under `root`."""
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.store import build_database
    from darwinlm.core.evaluation.metrics import perplexity

    start = time.perf_counter()
    database = build_database(model, ids, root, calibration_digest=calibration_digest, config=config,
                              batch_size=batch_size, base_model_digest=digest, progress=True)
    build_s = time.perf_counter() - start
    levels = uniform_levels(database, 0.5)
    assembly = LiveAssembly(model, database, base_model_digest=digest)
    assembly.apply(levels)
    ppl = perplexity(model, eval_windows, progress=True, desc=desc)
    assembly.apply({key: 0 for key in levels})
    return ppl, build_s


def other_gqa_order_ppl(model, ids, calibration_digest, eval_windows, digest, batch_size: int, root: str,
                        cost_aware: bool) -> tuple[float, float]:
    """(held-out uniform-50% ppl, build seconds) of the database built with `gqa_cost_aware=cost_aware` (the
    setting the main database does not use), on the main database's calibration rows, windows and parameter
    budget."""
    from darwinlm.core.database.store import DatabaseConfig

    return uniform50_ppl(model, ids, calibration_digest, eval_windows, digest, batch_size, root,
                         DatabaseConfig(storage_dtype="float16", gqa_cost_aware=cost_aware),
                         f"ppl gqa_cost_aware={cost_aware} 50%")


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="calibration rows of 512 tokens")
    parser.add_argument("--windows", type=int, default=40,
                        help="held-out test windows of 512 tokens per text (and as many validation windows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-peer", action="store_true", help="do not run torch-pruning")
    parser.add_argument("--search-generations", type=int, default=10,
                        help="generations of the short search whose genome the refit is also measured on")
    parser.add_argument("--refit-weights", default="0,0.15,0.3,0.5,1",
                        help="dense weights of the uniform-50%% refit's curve ('' to measure the default alone)")
    return parser.parse_args()


def main() -> None:
    apply_offline_defaults()
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.data.windows import TEST, VALIDATION, held_out_windows, windows_used
    from darwinlm.core.database.store import DatabaseConfig, build_database, model_digest
    from darwinlm.core.evaluation.metrics import perplexity
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.config import PostTrainConfig

    args = _parse_args()
    shipped_weight = PostTrainConfig().refit_dense_weight  # measured too, whatever the curve's points
    origin = provenance(vars(args), {"calibration_sample": 0})  # at the start: the commit that ran
    model, tokenizer = load_model("smollm2")
    split = default_split()
    ids, calibration_digest = calibration_rows(split, tokenizer, args.rows, 512)
    # sotu (in domain) then moby: the default split's evaluation sets, each named by its text
    held_out = {name: held_out_windows(docs, tokenizer, 512, args.windows) for name, docs in split.evaluation.items()}
    eval_windows = held_out["sotu"].of(TEST)
    # The refit is measured on both held-out texts: on SOTU alone it looked harmful, while it helps on Moby-Dick.
    refit_windows = {name: windows.of(TEST) for name, windows in held_out.items()}
    digest = model_digest(model)
    dense_bytes = sum(p.numel() for p in model.parameters()) * 4
    load_before = list(os.getloadavg())

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        database = build_database(model, ids, root, calibration_digest=calibration_digest,
                                  config=DatabaseConfig(storage_dtype="float16"), batch_size=args.batch_size,
                                  base_model_digest=digest, progress=True)
        build_s = time.perf_counter() - start
        peak_rss = _peak_rss_gb()  # before anything else allocates: the build's own peak (plus the model)
        forward_s = _time_forward(model, ids, args.batch_size)
        load_after_timing = list(os.getloadavg())
        db_bytes = sum(f.stat().st_size for f in Path(database.root).rglob("*") if f.is_file())
        ratios = error_ratios(model, ids, database, args.batch_size)

        levels = uniform_levels(database, 0.5)
        assembly = LiveAssembly(model, database, base_model_digest=digest)
        assembly.apply(levels)
        kept_fraction = assembly.kept_params() / database.manifest["dense_params"]
        ppl_obs_both = held_out_ppl(model, refit_windows, "obs 50%")
        ppl_obs = ppl_obs_both["sotu"]
        assembly.apply({key: 0 for key in levels})
        ppl_dense_both = held_out_ppl(model, refit_windows, "dense")
        ppl_dense = ppl_dense_both["sotu"]
        # The dense weight's curve. The refit's own calibration rows cannot choose the weight (their ppl keeps
        # falling as the pull overfits them), nor can the test windows, which report: the validation windows of
        # both held-out texts choose it (one perplexity over all of them), and every refit after the curve uses
        # the choice.
        validation = torch.cat([windows.of(VALIDATION) for windows in held_out.values()])
        curve_windows = {**refit_windows, "calibration": ids[:16], "validation": validation}
        refit_curve = []
        for dense_weight in sorted({float(w) for w in args.refit_weights.split(",") if w} | {shipped_weight}):
            ppl, seconds = _refit_ppl(model, database, levels, ids, curve_windows, digest, args.batch_size, False,
                                      dense_weight)
            refit_curve.append({"dense_weight": dense_weight, "ppl_calibration": ppl["calibration"],
                                "ppl_validation": ppl["validation"], "ppl_sotu": ppl["sotu"],
                                "ppl_moby": ppl["moby"], "refit_s": seconds})
        chosen = min(refit_curve, key=lambda point: point["ppl_validation"])
        weight = chosen["dense_weight"]
        ppl_refit, refit_s = {"sotu": chosen["ppl_sotu"], "moby": chosen["ppl_moby"]}, chosen["refit_s"]
        ppl_reselect, _ = _refit_ppl(model, database, levels, ids, refit_windows, digest, args.batch_size, True,
                                     weight)
        searched = searched_levels(model, database, split, tokenizer, digest, args.search_generations)
        assembly.apply(searched)
        ppl_searched = held_out_ppl(model, refit_windows, "searched 50%")
        assembly.apply({key: 0 for key in searched})
        ppl_searched_refit, _ = _refit_ppl(model, database, searched, ids, refit_windows, digest, args.batch_size,
                                           False, weight)
        main_cost_aware = database.config.gqa_cost_aware  # the shipped default; the other order is built to compare
        ppl_other, other_build_s = other_gqa_order_ppl(model, ids, calibration_digest, eval_windows, digest,
                                                       args.batch_size, root, not main_cost_aware)
        ppl_cost_aware, ppl_plain = (ppl_obs, ppl_other) if main_cost_aware else (ppl_other, ppl_obs)
        _magnitude_model(model, database, levels)  # last: it prunes the live model in place
        ppl_magnitude = perplexity(model, eval_windows, progress=True, desc="ppl magnitude 50%")

    results = {
        "model": "SmolLM2-135M-Instruct", "calibration_rows": args.rows, "seq_len": 512,
        "eval_windows": int(eval_windows.shape[0]), "windows": windows_used(held_out, TEST),
        "refit_dense_weight_chosen_on": windows_used(held_out, VALIDATION),
        "kept_block_fraction_uniform50": kept_fraction,
        "obs_vs_magnitude_error_ratio_max": max(ratios),
        "obs_vs_magnitude_error_ratio_median": statistics.median(ratios),
        "obs_vs_magnitude_pairs": len(ratios),
        "ppl_dense": ppl_dense, "ppl_uniform50_obs": ppl_obs, "ppl_uniform50_magnitude": ppl_magnitude,
        "ppl_uniform50_torch_pruning": None,
        "refit_dense_weight": weight, "refit_dense_weight_shipped": shipped_weight,
        "refit_dense_weight_curve": refit_curve,
        "ppl_uniform50_refit": ppl_refit["sotu"], "refit_ppl_ratio_uniform50": ppl_refit["sotu"] / ppl_obs,
        "ppl_searched50": ppl_searched["sotu"], "ppl_searched50_refit": ppl_searched_refit["sotu"],
        "refit_ppl_ratio_searched50": ppl_searched_refit["sotu"] / ppl_searched["sotu"],
        "ppl_uniform50_refit_reselect": ppl_reselect["sotu"],
        "refit_reselect_ppl_ratio_uniform50": ppl_reselect["sotu"] / ppl_obs,
        # the same on Moby-Dick (the keys above are SOTU, the text every other figure here is measured on)
        "ppl_dense_moby": ppl_dense_both["moby"], "ppl_uniform50_obs_moby": ppl_obs_both["moby"],
        "ppl_uniform50_refit_moby": ppl_refit["moby"],
        "refit_ppl_ratio_uniform50_moby": ppl_refit["moby"] / ppl_obs_both["moby"],
        "ppl_searched50_moby": ppl_searched["moby"], "ppl_searched50_refit_moby": ppl_searched_refit["moby"],
        "refit_ppl_ratio_searched50_moby": ppl_searched_refit["moby"] / ppl_searched["moby"],
        "refit_reselect_ppl_ratio_uniform50_moby": ppl_reselect["moby"] / ppl_obs_both["moby"],
        "database_gqa_cost_aware": main_cost_aware,
        "ppl_uniform50_gqa_cost_aware": ppl_cost_aware, "ppl_uniform50_gqa_plain": ppl_plain,
        "gqa_cost_aware_ppl_ratio": ppl_cost_aware / ppl_plain, "other_gqa_order_build_s": other_build_s,
        "refit_time_ratio_vs_forward": refit_s / forward_s,
        "build_s": build_s, "calibration_forward_s": forward_s, "build_time_ratio_vs_forward": build_s / forward_s,
        "load_average_before_build": load_before, "load_average_after_forward": load_after_timing,
        "peak_rss_gb": peak_rss, "fp32_model_gb": dense_bytes / 2**30,
        "db_size_ratio_vs_dense": db_bytes / dense_bytes,
    }
    if not args.skip_peer:
        from bench.peers.torch_pruning import prune_uniform_taylor

        peer_model, _ = load_model("smollm2")
        peer = prune_uniform_taylor(peer_model, ids, kept_fraction)  # the same calibration rows as OBS
        results["ppl_uniform50_torch_pruning"] = perplexity(peer_model, eval_windows, progress=True, desc="ppl torch-pruning")
        results["kept_block_fraction_torch_pruning"] = peer["kept_block_params"] / peer["dense_block_params"]
        results["torch_pruning_calibration_rows"] = int(ids.shape[0])
    _report(results, origin)


def _report(results: dict, origin: dict) -> None:
    goals = {
        "obs_vs_magnitude_error_ratio_max": "≤ 1.0",
        "ppl_uniform50_obs": "≤ 0.5 × magnitude and peer",
        "build_time_ratio_vs_forward": "≤ 1.5 (quiet machine; see load_average_*)",
        "refit_ppl_ratio_uniform50": "≤ 0.95",
        "refit_ppl_ratio_searched50": "< 1",
        "refit_ppl_ratio_uniform50_moby": "≤ 0.95",
        "peak_rss_gb": f"≤ {3 * results['fp32_model_gb']:.2f} (3 × fp32 model)",
        "db_size_ratio_vs_dense": "≤ 3 (fp16)",
    }
    write_results("database", results, goals, origin=origin)


if __name__ == "__main__":
    main()
