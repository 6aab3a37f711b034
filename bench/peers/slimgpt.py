"""SlimGPT (Ling et al., NeurIPS 2024): structured OBS layer by layer, on the inputs of the already-pruned layers
below, with a fixed pruning-ratio schedule that grows logarithmically with depth.

Layer by layer (SparseGPT's sequential recipe, as darwinlm's refit walks it): collect the Hessian H = 2/n Σ xxᵀ of
o_proj's inputs with the calibration rows propagated through the pruned layers below; remove heads greedily by
structured OBS (each removal the head of least error tr(W_J [H⁻¹]_JJ⁻¹ W_Jᵀ), the remaining columns updated to
compensate; only heads of the KV groups that have lost the fewest are eligible, so groups stay even: darwinlm's
`greedy_prune` with its database's even-group rule); install the shrunk attention; collect down_proj's Hessian, which now sees the pruned attention, and
remove MLP channels the same way (darwinlm's `greedy_prune`); run the pruned block to get the next one's inputs.

Ratios ("Incremental Pruning Ratio"): layer i removes r_i = min(1, s · ln(i + 2)) of its block parameters, so
shallow layers lose less than deep ones, whose errors have fewer layers left to grow through; s is set by
bisection so the whole model lands on the parameter target. Within a layer, attention keeps the head count
nearest r_i (whole KV-group rounds) and the MLP width makes up the layer's share (surgery.uniform_plan).

Departures: the schedule's exact curve (the paper fixes first- and last-layer ratios around the target; here one
log curve is scaled), GQA (heads removed in rounds of one per KV group, groups kept even, as darwinlm's
database does), and the greedy is exact per unit rather than the paper's batched greedy with dynamic group sizes
(which approximates the same per-unit greedy faster). Damping 1% of mean diag(H), darwinlm's default.
"""

import math
import time

import torch

from bench.peers import PeerResult
from bench.peers.surgery import (LayerShape, block_params, check_landing, keep_channels, keep_heads, start_pruning,
                                 uniform_plan)
from darwinlm.core.database.hessians import HessianAccumulator
from darwinlm.core.database.obs import greedy_prune, inverse_hessian
from darwinlm.core.database.structure import ModuleShape, module_shapes
from darwinlm.core.model.arch import arch_for
from darwinlm.core.model.driver import BlockDriver

RELATIVE_DAMPING = 0.01


def layer_ratios(n_layers: int, scale: float) -> list[float]:
    """Fraction of block parameters removed in each layer: min(1, scale · ln(i + 2)), increasing with depth."""
    return [min(1.0, scale * math.log(layer + 2)) for layer in range(n_layers)]


def schedule(shape: LayerShape, n_layers: int, target: int, steps: int = 60) -> list[tuple[int, int]]:
    """Per layer (query heads kept per KV group, MLP channels kept) on the log schedule whose scale brings the
    kept block parameters nearest `target` (bisection: the kept count falls as the scale grows)."""
    def plans(scale):
        return [uniform_plan(shape, 1.0 - ratio) for ratio in layer_ratios(n_layers, scale)]

    def kept(plan):
        return sum(shape.even_attn_params(heads) + shape.mlp_params(channels) for heads, channels in plan)

    low, high = 0.0, 1.0 / math.log(2)  # at `high` every layer is removed
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(plans(middle)) > target else (low, middle)
    return min((plans(low), plans(high)), key=lambda plan: abs(kept(plan) - target))


def head_units(model) -> ModuleShape:
    """darwinlm's unit view of an attention with query heads as units (every layer of a dense model shares it): its
    `heads_of_groups_behind` is the rule that keeps KV groups even during the greedy."""
    return module_shapes(model, arch_for(model), "query_heads")[0]["attn"]


def input_hessian(driver: BlockDriver, linear) -> torch.Tensor:
    """H of `linear`'s inputs over the driver's current block inputs (the block is not advanced)."""
    accumulator = HessianAccumulator(linear.in_features, linear.weight.device)
    handle = linear.register_forward_pre_hook(lambda _m, args: accumulator.add(args[0]))
    try:
        driver.observe(stop_at=linear)
    finally:
        handle.remove()
    return accumulator.hessian()


def obs_prune(driver: BlockDriver, linear, unit_size: int, removed: int, eligible=None):
    """Greedy structured OBS on `linear`'s inputs in the driver's current block: `removed` units of `unit_size`
    input columns (a head, or one channel), from the Hessian of its propagated inputs."""
    hinv = inverse_hessian(input_hessian(driver, linear), RELATIVE_DAMPING)
    return greedy_prune(linear.weight.detach().float(), hinv, unit_size, [removed], eligible=eligible)[0]


@torch.no_grad()
def prune_layer(model, driver: BlockDriver, shape: LayerShape, heads: ModuleShape, layer: int,
                plan: tuple[int, int]) -> dict:
    """Prune block `layer` (the driver's next) to `plan` with OBS on its propagated inputs; returns kept units."""
    spec, block = driver.spec, driver.blocks[layer]
    heads_per_group, channels = plan
    kept_heads = torch.arange(shape.query_heads)
    if heads_per_group == 0:
        kept_heads = kept_heads[:0]
        keep_heads(model, shape, layer, kept_heads)
    elif heads_per_group < shape.group_size:
        output = spec.attention_of(block).get_submodule(spec.o_proj)
        removed = (shape.group_size - heads_per_group) * shape.kv_heads
        pruned = obs_prune(driver, output, shape.head_dim, removed, eligible=heads.heads_of_groups_behind)
        kept_heads = pruned.kept_units
        keep_heads(model, shape, layer, kept_heads, o_weight=pruned.weight)
    kept_channels = torch.arange(shape.width)
    if channels == 0:
        kept_channels = kept_channels[:0]
        keep_channels(model, shape, layer, kept_channels)
    elif channels < shape.width:
        down = spec.mlp_of(block).get_submodule(spec.down_proj)
        pruned = obs_prune(driver, down, 1, shape.width - channels)
        kept_channels = pruned.kept_units
        keep_channels(model, shape, layer, kept_channels, down_weight=pruned.weight)
    driver.advance()
    return {(layer, "attn"): kept_heads, (layer, "mlp"): kept_channels}


@torch.no_grad()
def prune(model, calibration_ids: torch.Tensor, kept_fraction: float, *, batch_size: int = 8) -> PeerResult:
    """SlimGPT IN PLACE on a dense model (see the module docstring); calibration_ids: (n, seq_len) int64."""
    run = start_pruning(model, kept_fraction)
    start, shape, dense, target, n_layers = run.started, run.shape, run.dense, run.target, len(run.blocks)
    plans = schedule(shape, n_layers, target)
    heads = head_units(model)
    driver = BlockDriver(model, calibration_ids, batch_size=batch_size)
    kept_units = {}
    for layer, plan in enumerate(plans):
        kept_units.update(prune_layer(model, driver, shape, heads, layer, plan))
    kept = block_params(model)
    check_landing("slimgpt", kept, target)
    return PeerResult(kept, dense, time.perf_counter() - start, kept_units,
                      {"query_heads_per_layer": [heads * shape.kv_heads for heads, _ in plans],
                       "channels_per_layer": [channels for _, channels in plans]})
