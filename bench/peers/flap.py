"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning with bias compensation, no training.

One dense pass over the calibration rows gives, for every input feature j of each output projection (o_proj,
down_proj), the mean and variance of x_j over tokens. Then:
  * score ("WIFV"): S_j = Var(x_j)·‖W[:, j]‖², summed over a head's head_dim columns for attention: a feature
    whose input barely fluctuates can be replaced by its mean;
  * standardise the scores within each layer and module kind ((S − mean) / std), so attention and MLP scores of
    every layer share one scale;
  * rank every unit of every layer together, least score first, and remove units until the kept block parameters
    reach the target (each unit weighted by the parameters it frees, as FLAP's compression weights do): the widths
    per layer come out of the ranking (the paper's adaptive structure, "AL-AM");
  * compensate: add W[:, removed] @ mean(x_removed) to the output projection's bias, so each pruned module's
    output keeps its dense mean on the calibration tokens. No other weight changes.

Departures: GQA, which the paper's LLaMA-1 models lack: an attention unit is a round of heads, the least-scored
remaining head of each KV group together (scored by their mean), so groups stay even. Every layer keeps at least
one round of heads and one MLP channel: a module removed outright would need a bias-only module, which the pruned
model class does not have (FLAP's code can remove a whole module, keeping its bias). A unit whose removal would
cross the target is skipped and the ranking goes on with smaller ones (at most one MLP channel above the target).
"""

import time

import torch

from bench.peers import PeerResult
from bench.peers.surgery import (LayerShape, block_params, check_landing, keep_channels, keep_heads,
                                 output_projection_statistics, start_pruning)
from darwinlm.core.database.structure import unit_columns


def fluctuation(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Var(x_j)·‖W[:, j]‖² per input column j. weight: (d_out, d_in); variance: (d_in,). Returns (d_in,) float64."""
    return (weight.detach().double().square().sum(0).cpu() * variance.cpu())


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(s − mean) / std over one layer's units of one kind (std 0, one unit: all zeros)."""
    spread = scores.std() if scores.numel() > 1 else torch.tensor(0.0, dtype=scores.dtype)
    return (scores - scores.mean()) / spread if spread > 0 else torch.zeros_like(scores)


def layer_units(layer: int, head_scores: torch.Tensor, channel_scores: torch.Tensor, shape: LayerShape) -> list:
    """The removable units of one layer: (score, layer, kind, order, indices, params freed). Attention: rounds of
    one head per KV group (the r-th least-scored of each group), all but the last round; MLP: channels, all but
    the best one. head_scores: (query_heads,), channel_scores: (width,), both standardised."""
    groups = head_scores.reshape(shape.kv_heads, shape.group_size)
    order = groups.argsort(dim=1)  # ascending within each group
    units = []
    for round_index in range(shape.group_size - 1):
        heads = order[:, round_index] + torch.arange(shape.kv_heads) * shape.group_size
        kept_before = shape.group_size - round_index
        freed = shape.even_attn_params(kept_before) - shape.even_attn_params(kept_before - 1)
        units.append((float(head_scores[heads].mean()), layer, "attn", round_index, heads.tolist(), freed))
    for rank, channel in enumerate(channel_scores.argsort()[:-1].tolist()):
        units.append((float(channel_scores[channel]), layer, "mlp", rank, [channel], shape.channel_params))
    return units


def select_removals(units: list, dense: int, target: int, n_layers: int) -> dict:
    """{(layer, kind): removed unit indices} from the global ranking, least score first, never below `target`.
    A skipped attention round blocks that layer's later rounds (rounds are nested)."""
    removed = {(layer, kind): [] for layer in range(n_layers) for kind in ("attn", "mlp")}
    blocked, kept = set(), dense
    for _score, layer, kind, order, indices, freed in sorted(units, key=lambda u: u[:4]):
        if (layer, kind) in blocked:
            continue
        if kept - freed < target:
            if kind == "attn":
                blocked.add((layer, kind))
            continue
        removed[(layer, kind)].extend(indices)
        kept -= freed
    return removed


def compensation_bias(weight: torch.Tensor, bias: torch.Tensor | None, removed_columns: torch.Tensor,
                      mean: torch.Tensor) -> torch.Tensor:
    """bias + W[:, removed] @ mean(x_removed): the removed columns' average contribution, made constant.
    weight: (d_out, d_in); mean: (d_in,) float64. Returns (d_out,) in weight's dtype."""
    columns = removed_columns.to(weight.device)
    added = weight.detach().double()[:, columns] @ mean.to(weight.device)[columns]
    base = torch.zeros_like(added) if bias is None else bias.detach().double()
    return (base + added).to(weight.dtype)


@torch.no_grad()
def prune(model, calibration_ids: torch.Tensor, kept_fraction: float, *, batch_size: int = 8) -> PeerResult:
    """FLAP IN PLACE on a dense model (see the module docstring); calibration_ids: (n, seq_len) int64."""
    run = start_pruning(model, kept_fraction)
    start, shape, spec, blocks, dense, target = run.started, run.shape, run.spec, run.blocks, run.dense, run.target
    statistics = output_projection_statistics(model, calibration_ids, batch_size)
    outputs = [{"attn": spec.attention_of(b).get_submodule(spec.o_proj), "mlp": spec.mlp_of(b).get_submodule(spec.down_proj)}
               for b in blocks]
    units = []
    for layer, linears in enumerate(outputs):
        heads = fluctuation(linears["attn"].weight, statistics[layer]["attn"].variance)
        channels = fluctuation(linears["mlp"].weight, statistics[layer]["mlp"].variance)
        units += layer_units(layer, standardise(heads.reshape(shape.query_heads, -1).sum(1)), standardise(channels),
                             shape)
    removed = select_removals(units, dense, target, len(blocks))
    kept_units = {}
    for (layer, kind), gone in removed.items():
        size = shape.query_heads if kind == "attn" else shape.width
        kept = torch.tensor(sorted(set(range(size)) - set(gone)), dtype=torch.long)
        kept_units[(layer, kind)] = kept
        unit_size = shape.head_dim if kind == "attn" else 1
        linear, mean = outputs[layer][kind], statistics[layer][kind].mean
        bias = None if not gone else compensation_bias(
            linear.weight, linear.bias, unit_columns(torch.tensor(sorted(gone)), unit_size), mean)
        if kind == "attn":
            keep_heads(model, shape, layer, kept, o_bias=bias)
        else:
            keep_channels(model, shape, layer, kept, down_bias=bias)
    kept_params = block_params(model)
    check_landing("flap", kept_params, target)
    return PeerResult(kept_params, dense, time.perf_counter() - start, kept_units,
                      {"query_heads_per_layer": [len(kept_units[(i, "attn")]) for i in range(len(blocks))],
                       "channels_per_layer": [len(kept_units[(i, "mlp")]) for i in range(len(blocks))]})
