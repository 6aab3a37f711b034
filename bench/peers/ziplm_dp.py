"""ZipLM-DP (Kurtic et al., NeurIPS 2023): the per-module OBS database plus a dynamic programme that picks one
level per module so that the summed stored errors are least at the exact parameter budget.

The database is darwinlm's own (the same levels, errors and OBS-updated weights the search picks from), and the DP
is darwinlm's `allocate` (darwinlm.core.search.start) with every weight 1 and no trust region: darwinlm's informed
start without its KL slopes and without its radius around uniform, and with no search after it. The question it
answers: is the evolutionary search needed, or does the DP over additive layer errors give as good a genome?

Departures: ZipLM's own database prunes on its calibration inputs with its OBS greedy, as darwinlm's does; its
errors are relative output errors ‖WX − ŴX‖² / ‖WX‖² (so modules of different energy add up on one scale), where
ZipLM sums absolute errors. The levels are darwinlm's ladder (10% steps, MLP widths aligned, KV groups even), not
ZipLM's speedup-table levels. The genome costs within one level step (and within 0.5%) below the target.
"""

import time
from dataclasses import replace

import torch

from bench.peers import LANDING_TOLERANCE, PeerResult
from bench.peers.surgery import block_params, check_landing
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.search.genome import Budget, Genome
from darwinlm.core.search.start import allocate, database_errors


def dp_levels(budget: Budget, errors: list[list[float]]) -> tuple[int, ...]:
    """One level per module (genome order) minimising Σ errors[i][level] with a cost in [target − tolerance,
    target]: `allocate` with weights 1 and no radius. A one-line ValueError when no genome lies in that band."""
    try:
        return allocate(budget, errors, weights=None, around=None, radius=None)
    except IndexError:  # allocate's repair found no module to step back into the band
        raise ValueError(f"ziplm_dp: no genome of this database costs within {budget.tolerance} of the target "
                         f"{budget.target}; its levels are too coarse for that band") from None


def landing_budget(database, kept_fraction: float) -> Budget:
    """darwinlm's Budget at this fraction, its band narrowed to LANDING_TOLERANCE below the target if wider (on
    SmolLM2 its one-level-step band, at most 0.42%, is already inside)."""
    budget = Budget.from_database(database, fraction_removed=1.0 - kept_fraction)
    return replace(budget, tolerance=min(budget.tolerance, int(LANDING_TOLERANCE * budget.target)))


@torch.no_grad()
def prune(model, calibration_ids: torch.Tensor, kept_fraction: float, *, database=None) -> PeerResult:
    """ZipLM-DP IN PLACE on the dense model `database` was built from (on these calibration rows: the caller
    passes the database it built from them; the build is not in this peer's wall time)."""
    if database is None:
        raise ValueError("ziplm_dp needs database=: the darwinlm database built from this model and these rows")
    start = time.perf_counter()
    dense = block_params(model)
    budget = landing_budget(database, kept_fraction)
    genome = Genome(dp_levels(budget, database_errors(database)), database.digest)
    assembly = LiveAssembly(model, database)
    assembly.apply(genome.assignment(), rebuild=True)
    kept = block_params(model)
    if kept != budget.cost(genome.levels):
        raise RuntimeError(f"ziplm_dp: the model keeps {kept} block params, the database says {budget.cost(genome.levels)}")
    check_landing("ziplm_dp", kept, budget.target)
    kept_units = {}
    for (layer, kind), level in genome.assignment().items():
        module = database.module(layer, kind)
        if level == 0:
            kept_units[(layer, kind)] = torch.arange(module["n_units"])
        elif level == database.num_levels(layer, kind) - 1:
            kept_units[(layer, kind)] = torch.arange(0)
        else:
            kept_units[(layer, kind)] = database.load(layer, kind, level).kept_units
        if kind == "attn" and database.manifest["config"]["gqa_mode"] == "kv_groups":  # units are whole KV groups
            group = module["unit_size"] // database.manifest["base_model"]["head_layout"]["head_dim"]
            kept_units[(layer, kind)] = (kept_units[(layer, kind)][:, None] * group + torch.arange(group)).flatten()
    return PeerResult(kept, dense, time.perf_counter() - start, kept_units,
                      {"levels": genome.to_json(), "stored_error": sum(
                          database.error(layer, kind, level) for (layer, kind), level in genome.assignment().items())})
