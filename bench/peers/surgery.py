"""What every peer shares: the block-parameter count darwinlm's Budget uses, physical slicing of heads and
channels (to darwinlm's pruned-model shapes), and one dense pass collecting output-projection input statistics.

Counting (as darwinlm.core.database.structure.ModuleShape.params_kept): an attention counts its q, k, v weights
and biases and its o_proj weight; an MLP its gate, up and down weights, and their biases where the dense MLP has
them (mlp_bias). A compensation bias a peer adds to o_proj or down_proj (FLAP's) is not counted: it is hidden-size
per module (0.03% of SmolLM2's block parameters) and darwinlm's budget has no term for it.
"""

import time
from dataclasses import dataclass

import torch
from torch import nn

from bench.peers import LANDING_TOLERANCE
from darwinlm.core.database.structure import unit_columns
from darwinlm.core.model.arch import arch_for
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP, set_attention_widths


@dataclass(frozen=True)
class LayerShape:
    """The dense shape of one decoder layer (every layer of a dense model has the same) and its costs."""

    hidden: int
    head_dim: int
    query_heads: int
    kv_heads: int
    width: int
    qkv_bias: bool
    mlp_bias: bool

    @property
    def group_size(self) -> int:
        return self.query_heads // self.kv_heads

    def attn_params(self, query_heads: int, kv_heads: int | None = None) -> int:
        """Attention parameters with `query_heads` kept (over `kv_heads`, default: every KV head while any query
        head is kept, as even groups do)."""
        if query_heads == 0:
            return 0
        kv = self.kv_heads if kv_heads is None else kv_heads
        return (query_heads + 2 * kv) * self.head_dim * (self.hidden + self.qkv_bias) + query_heads * self.head_dim * self.hidden

    def even_attn_params(self, per_group: int) -> int:
        """Attention parameters with `per_group` query heads kept in every KV group."""
        return self.attn_params(per_group * self.kv_heads)

    def mlp_params(self, channels: int) -> int:
        if channels == 0:
            return 0
        return channels * (3 * self.hidden + 2 * self.mlp_bias) + self.hidden * self.mlp_bias

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden + 2 * self.mlp_bias

    @property
    def dense(self) -> int:
        return self.attn_params(self.query_heads) + self.mlp_params(self.width)


def layer_shape(model) -> LayerShape:
    """The dense layer shape of `model`, or a one-line ValueError if its layers differ (already pruned)."""
    spec = arch_for(model)
    layout = spec.head_layout(model.config)
    blocks = spec.block_list(model)
    widths = {spec.mlp_of(block).get_submodule(spec.down_proj).in_features if not isinstance(spec.mlp_of(block), ZeroMLP)
              else -1 for block in blocks}
    queries = {0 if isinstance(spec.attention_of(b), ZeroAttention)
               else spec.attention_of(b).get_submodule(spec.o_proj).in_features for b in blocks}
    if len(widths) != 1 or len(queries) != 1 or queries != {layout.query_heads * layout.head_dim}:
        raise ValueError("a peer prunes a dense model: this one's layers already differ in width")
    attention, mlp = spec.attention_of(blocks[0]), spec.mlp_of(blocks[0])
    return LayerShape(hidden=model.config.hidden_size, head_dim=layout.head_dim, query_heads=layout.query_heads,
                      kv_heads=layout.kv_heads, width=widths.pop(),
                      qkv_bias=spec.input_linears(attention, "attn")[0][0].bias is not None,
                      mlp_bias=spec.input_linears(mlp, "mlp")[0][0].bias is not None)


def block_params(model) -> int:
    """Kept block parameters of a (possibly shrunk) live model, counted as darwinlm's Budget counts them."""
    spec = arch_for(model)
    total = 0
    for block in spec.block_list(model):
        attention, mlp = spec.attention_of(block), spec.mlp_of(block)
        if not isinstance(attention, ZeroAttention):
            total += sum(_weight_and_bias(linear) for linear, _ in spec.input_linears(attention, "attn"))
            total += attention.get_submodule(spec.o_proj).weight.numel()
        if not isinstance(mlp, ZeroMLP):
            inputs = spec.input_linears(mlp, "mlp")
            total += sum(_weight_and_bias(linear) for linear, _ in inputs)
            down = mlp.get_submodule(spec.down_proj)
            total += down.weight.numel() + (down.bias.numel() if inputs[0][0].bias is not None else 0)
    return total


def _weight_and_bias(linear: nn.Linear) -> int:
    return linear.weight.numel() + (0 if linear.bias is None else linear.bias.numel())


def target_params(shape: LayerShape, n_layers: int, kept_fraction: float) -> int:
    """The kept block parameters a peer aims at: darwinlm's Budget target for the same fraction."""
    if not 0.0 < kept_fraction <= 1.0:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    return int(round(n_layers * shape.dense * kept_fraction))


@dataclass(frozen=True)
class PruningRun:
    """What every peer's prune() starts from: its clock, the dense model's layer shape, architecture, decoder
    blocks, dense block parameters and the target it must land on."""

    started: float
    shape: LayerShape
    spec: object
    blocks: list
    dense: int
    target: int


def start_pruning(model, kept_fraction: float) -> PruningRun:
    """Time starts here, before any calibration pass: a peer's wall time includes all of its own work."""
    started = time.perf_counter()
    shape, spec = layer_shape(model), arch_for(model)
    blocks = spec.block_list(model)
    return PruningRun(started, shape, spec, blocks, block_params(model),
                      target_params(shape, len(blocks), kept_fraction))


def check_landing(peer: str, kept: int, target: int) -> None:
    """A one-line ValueError unless `kept` is within LANDING_TOLERANCE of `target`."""
    if abs(kept - target) > LANDING_TOLERANCE * target:
        raise ValueError(f"{peer} kept {kept} block params, {abs(kept / target - 1):.2%} off the target {target} "
                         f"(tolerance {LANDING_TOLERANCE:.1%}); this model's units are too coarse for that fraction")


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give `linear` new tensors in place (the module object, and so any hook or optimizer reference, stays)."""
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def even_groups(kept_heads: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """The KV heads `kept_heads` read, or a ValueError unless every KV group keeps the same number of query heads."""
    groups, counts = torch.unique(kept_heads // shape.group_size, return_counts=True)
    if len(groups) != shape.kv_heads or bool((counts != counts[0]).any()):
        raise ValueError(f"query heads {kept_heads.tolist()} are not even over {shape.kv_heads} KV groups")
    return groups


@torch.no_grad()
def keep_heads(model, shape: LayerShape, layer: int, kept_heads: torch.Tensor, o_weight: torch.Tensor | None = None,
               o_bias: torch.Tensor | None = None) -> None:
    """Shrink a dense attention (of `shape`, the model's layer_shape before any slicing) to `kept_heads`
    (ascending query heads, even over KV groups; empty: removed).

    o_weight: (hidden, kept × head_dim) output columns to install (default: the dense ones); o_bias: (hidden,)
    o_proj bias to install (default: the existing bias, None if it has none).
    """
    spec = arch_for(model)
    block = spec.block_list(model)[layer]
    attention = spec.attention_of(block)
    if kept_heads.numel() == 0:
        setattr(block, spec.attention, ZeroAttention(layer))
        return
    kv_heads = even_groups(kept_heads, shape)
    rows = {"q_proj": unit_columns(kept_heads, shape.head_dim), "k_proj": unit_columns(kv_heads, shape.head_dim),
            "v_proj": unit_columns(kv_heads, shape.head_dim)}
    sizes = {"q_proj": shape.query_heads * shape.head_dim, "k_proj": shape.kv_heads * shape.head_dim,
             "v_proj": shape.kv_heads * shape.head_dim}
    _slice_inputs(spec, attention, "attn", rows, sizes)
    output = attention.get_submodule(spec.o_proj)
    columns = rows["q_proj"].to(output.weight.device)
    weight = output.weight[:, columns] if o_weight is None else o_weight.to(output.weight)
    bias = output.bias if o_bias is None else o_bias.to(output.weight)
    _set_linear(output, weight, None if bias is None else bias.detach().clone())
    set_attention_widths(attention, kept_heads.numel(), kv_heads.numel())


@torch.no_grad()
def keep_channels(model, shape: LayerShape, layer: int, kept: torch.Tensor, down_weight: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None) -> None:
    """Shrink a dense MLP to channels `kept` (ascending; empty: removed), with optional new down_proj columns
    (hidden, kept) and bias (hidden,) as in keep_heads."""
    spec = arch_for(model)
    block = spec.block_list(model)[layer]
    mlp = spec.mlp_of(block)
    if kept.numel() == 0:
        setattr(block, spec.mlp, ZeroMLP())
        return
    _slice_inputs(spec, mlp, "mlp", {"gate_proj": kept, "up_proj": kept},
                  {"gate_proj": shape.width, "up_proj": shape.width})
    down = mlp.get_submodule(spec.down_proj)
    weight = down.weight[:, kept.to(down.weight.device)] if down_weight is None else down_weight.to(down.weight)
    bias = down.bias if down_bias is None else down_bias.to(down.weight)
    _set_linear(down, weight, None if bias is None else bias.detach().clone())


def _slice_inputs(spec, module, kind: str, rows: dict, sizes: dict) -> None:
    """Keep `rows[part]` of each logical input projection; a fused linear (Phi-3) keeps each part's rows, stacked."""
    for linear, parts in spec.input_linears(module, kind):
        offsets, start = [], 0
        for part in parts:
            offsets.append(rows[part] + start)
            start += sizes[part]
        keep = torch.cat(offsets).to(linear.weight.device)
        _set_linear(linear, linear.weight[keep], None if linear.bias is None else linear.bias[keep])


def remove_layer(model, layer: int) -> None:
    """Remove a whole decoder layer: attention and MLP become darwinlm's zero modules (the block is the identity
    through its residual), as a database's last levels do."""
    spec = arch_for(model)
    block = spec.block_list(model)[layer]
    setattr(block, spec.attention, ZeroAttention(layer))
    setattr(block, spec.mlp, ZeroMLP())


class InputStatistics:
    """Per-feature Σx and Σx² (float64) over tokens of one linear's input, from forward pre-hooks."""

    def __init__(self):
        self.total, self.squares, self.tokens = None, None, 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).double()
        if self.total is None:
            self.total, self.squares = rows.sum(0), rows.square().sum(0)
        else:
            self.total += rows.sum(0)
            self.squares += rows.square().sum(0)
        self.tokens += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per feature, (d_in,) float64 (clamped at 0 against rounding)."""
        return (self.squares / self.tokens - self.mean.square()).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """‖x_j‖₂ over every token, (d_in,) float64."""
        return self.squares.sqrt()


@torch.no_grad()
def output_projection_statistics(model, calibration_ids: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Per layer {"attn": InputStatistics of o_proj's input, "mlp": of down_proj's input} over the calibration
    rows (n, seq_len) int64, in ONE dense pass (the driver walks block by block)."""
    driver = BlockDriver(model, calibration_ids, batch_size=batch_size)
    spec, statistics = driver.spec, []
    for block in driver.blocks:
        linears = {"attn": spec.attention_of(block).get_submodule(spec.o_proj),
                   "mlp": spec.mlp_of(block).get_submodule(spec.down_proj)}
        layer = {kind: InputStatistics() for kind in linears}
        handles = [linear.register_forward_pre_hook(lambda _m, args, into=layer[kind]: into.add(args[0]))
                   for kind, linear in linears.items()]
        try:
            driver.advance()
        finally:
            for handle in handles:
                handle.remove()
        statistics.append(layer)
    return statistics


def uniform_plan(shape: LayerShape, kept_fraction: float) -> tuple[int, int]:
    """(query heads kept per KV group, MLP channels kept) for one layer keeping `kept_fraction` of its block
    parameters: the head count whose attention fraction is nearest (ties: more heads), then the channel count
    that brings the layer nearest its share (torch-pruning's uniform plan, per layer)."""
    options = range(shape.group_size + 1)
    dense_attn = shape.attn_params(shape.query_heads)
    per_group = min(options, key=lambda g: (abs(shape.even_attn_params(g) / dense_attn - kept_fraction), -g))
    wanted = kept_fraction * shape.dense - shape.even_attn_params(per_group) - shape.hidden * shape.mlp_bias
    channels = max(0, min(shape.width, round(wanted / shape.channel_params)))
    return per_group, channels


def top_heads_per_group(head_scores: torch.Tensor, shape: LayerShape, per_group: int) -> torch.Tensor:
    """The `per_group` highest-scoring query heads of every KV group, ascending. head_scores: (query_heads,)."""
    grouped = head_scores.reshape(shape.kv_heads, shape.group_size)
    best = grouped.argsort(dim=1, descending=True)[:, :per_group]
    return (best + torch.arange(shape.kv_heads)[:, None] * shape.group_size).flatten().sort().values


def top_channels(channel_scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring channels, ascending."""
    return channel_scores.argsort(descending=True)[:count].sort().values
