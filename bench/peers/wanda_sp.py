"""Wanda-sp: Wanda's |W|·‖x‖ score made structured, the same ratio in every layer, no weight update.

As FLAP's paper (An et al., AAAI 2024) defines the baseline and its code runs it: for the output projections
(o_proj, down_proj), score each weight |W_ij|·‖x_j‖ with ‖x_j‖ the L2 norm of input feature j over the calibration
tokens, average over output rows to get one score per input column, sum a head's columns for a head score, and
keep the best heads / channels of every layer at the layer's ratio. The kept rows of q/k/v and gate/up follow.

Departures: GQA, which the paper's LLaMA-1 models lack: the best heads are kept within each KV group, the same
number in every group. The per-layer ratio is not one number for heads and channels as in FLAP's code: heads come
in whole KV-group rounds, so the head count nearest the target is taken and the MLP width makes up the rest of
the layer's share (surgery.uniform_plan), which is what lands the budget within 0.5%.
"""

import time

import torch

from bench.peers import PeerResult
from bench.peers.surgery import (block_params, check_landing, keep_channels, keep_heads, output_projection_statistics,
                                 start_pruning, top_channels, top_heads_per_group, uniform_plan)


def column_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """mean_i |W_ij|·‖x_j‖ per input column j. weight: (d_out, d_in); input_norm: (d_in,). Returns (d_in,) float64."""
    return (weight.detach().abs().double() * input_norm.to(weight.device)[None, :]).mean(0).cpu()


@torch.no_grad()
def prune(model, calibration_ids: torch.Tensor, kept_fraction: float, *, batch_size: int = 8) -> PeerResult:
    """Wanda-sp IN PLACE on a dense model (see the module docstring); calibration_ids: (n, seq_len) int64."""
    run = start_pruning(model, kept_fraction)
    start, shape, spec, blocks, dense, target = run.started, run.shape, run.spec, run.blocks, run.dense, run.target
    per_group, channels = uniform_plan(shape, kept_fraction)
    statistics = output_projection_statistics(model, calibration_ids, batch_size)
    kept_units = {}
    for layer, block in enumerate(blocks):
        output = spec.attention_of(block).get_submodule(spec.o_proj)
        head_scores = column_scores(output.weight, statistics[layer]["attn"].norm).reshape(shape.query_heads, -1).sum(1)
        down = spec.mlp_of(block).get_submodule(spec.down_proj)
        kept_units[(layer, "attn")] = top_heads_per_group(head_scores, shape, per_group)
        kept_units[(layer, "mlp")] = top_channels(column_scores(down.weight, statistics[layer]["mlp"].norm), channels)
        keep_heads(model, shape, layer, kept_units[(layer, "attn")])
        keep_channels(model, shape, layer, kept_units[(layer, "mlp")])
    kept = block_params(model)
    check_landing("wanda_sp", kept, target)
    return PeerResult(kept, dense, time.perf_counter() - start, kept_units,
                      {"query_heads_per_layer": per_group * shape.kv_heads, "channels_per_layer": channels})
