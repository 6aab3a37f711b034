"""What a unit is in each prunable module, which heads survive, and what a level costs in parameters.

Prunable modules are each block's attention ("attn") and MLP ("mlp"). Units are input-column groups of their
output projection (o_proj, down_proj); removing a unit also removes the rows that feed it (q/k/v, gate/up).

GQA: query head h reads KV head h // group_size. Two unit choices, recorded in the database manifest:
  * "query_heads": a unit is one query head; k/v stay, except a KV head with no query head left is dropped;
  * "kv_groups": a unit is one KV head with its whole group of query heads.
With "query_heads" and even KV groups (DatabaseConfig.even_kv_groups), a level removes the same number of query
heads from every KV group, so each level is a plain GQA layout (no duplicated KV heads in llama.cpp, no per-head
KV map in torch): the greedy then only picks among the heads of the groups that have lost the fewest so far.

MLP levels keep widths that are multiples of an alignment (DatabaseConfig.mlp_alignment): llama.cpp's CPU
matmul (tinyBLAS) takes its fast path only for aligned row counts and inner dimensions, and q8_0 stores rows in
blocks of 32 values (experiments/2026-12-04-mlp-alignment/note.md).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.model.arch import ArchSpec, HeadLayout

GQA_MODES = ("query_heads", "kv_groups")
MODULE_KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class ModuleShape:
    """The prunable shape of one module: how many units, columns per unit, and parameter costs."""

    kind: str
    n_units: int
    unit_size: int
    hidden_size: int
    layout: HeadLayout | None = None  # attention only
    gqa_mode: str | None = None
    has_qkv_bias: bool = False
    has_mlp_bias: bool = False

    def query_heads_of(self, kept_units: torch.Tensor) -> torch.Tensor:
        """Query heads kept by a set of kept attention units, ascending (int64)."""
        if self.gqa_mode == "query_heads":
            return kept_units
        group = self.layout.group_size
        return (kept_units[:, None] * group + torch.arange(group)).flatten()

    def kv_heads_of(self, kept_units: torch.Tensor) -> torch.Tensor:
        """KV heads that some kept query head still reads, ascending (int64)."""
        return torch.unique(self.query_heads_of(kept_units) // self.layout.group_size)

    def heads_of_groups_behind(self, removed: torch.Tensor) -> torch.Tensor:
        """(n_units,) bool: the query heads (query_heads units) whose KV group has lost no more heads than any
        other group, given removed: (n_units,) bool. Removing only these keeps groups even after every round of
        one removal per group."""
        group = torch.arange(self.n_units) // self.layout.group_size
        lost = torch.zeros(self.layout.kv_heads, dtype=torch.long).index_add_(0, group, removed.long())
        return lost[group] == lost.min()

    def params_kept(self, kept_units: torch.Tensor) -> int:
        """Weights (and biases) of the module's linears that remain when only `kept_units` are kept."""
        if kept_units.numel() == 0:
            return 0
        hidden = self.hidden_size
        if self.kind == "mlp":
            return int(kept_units.numel()) * (3 * hidden + 2 * self.has_mlp_bias) + hidden * self.has_mlp_bias
        head_dim = self.layout.head_dim
        q, kv = self.query_heads_of(kept_units).numel(), self.kv_heads_of(kept_units).numel()
        projections = (q + 2 * kv) * head_dim * (hidden + self.has_qkv_bias)
        return int(projections + q * head_dim * hidden)

    def dense_params(self) -> int:
        return self.params_kept(torch.arange(self.n_units))

    def params_freed(self, removed: torch.Tensor) -> torch.Tensor:
        """Per unit, the parameters that removing it frees once the units in `removed` are gone.

        removed: (n_units,) bool. Returns (n_units,) float64, 0 at removed units. With query_heads, the last
        query head of a KV group frees that group's k/v rows too: about twice a plain head's count on SmolLM2.
        Derived from `params_kept`, so a greedy that ranks by it and the levels it records count the same way.
        """
        kept_now = (~removed).nonzero().flatten()
        total = self.params_kept(kept_now)
        freed = torch.zeros(self.n_units, dtype=torch.float64)
        for unit in kept_now.tolist():
            freed[unit] = total - self.params_kept(kept_now[kept_now != unit])
        return freed


def module_shapes(model: nn.Module, spec: ArchSpec, gqa_mode: str) -> list[dict[str, ModuleShape]]:
    """Per block, {"attn": ModuleShape, "mlp": ModuleShape} read off the live (dense) model."""
    if gqa_mode not in GQA_MODES:
        raise ValueError(f"gqa_mode must be one of {GQA_MODES}, got {gqa_mode!r}")
    layout = spec.head_layout(model.config)
    hidden = model.config.hidden_size
    shapes = []
    for block in spec.block_list(model):
        attention, mlp = spec.attention_of(block), spec.mlp_of(block)
        per_kv_group = gqa_mode == "kv_groups"
        attn = ModuleShape(
            kind="attn",
            n_units=layout.kv_heads if per_kv_group else layout.query_heads,
            unit_size=layout.head_dim * (layout.group_size if per_kv_group else 1),
            hidden_size=hidden,
            layout=layout,
            gqa_mode=gqa_mode,
            has_qkv_bias=spec.input_linears(attention, "attn")[0][0].bias is not None,
        )
        down = mlp.get_submodule(spec.down_proj)
        mlp_shape = ModuleShape(
            kind="mlp", n_units=down.in_features, unit_size=1, hidden_size=hidden, has_mlp_bias=down.bias is not None
        )
        shapes.append({"attn": attn, "mlp": mlp_shape})
    return shapes


def level_ladder(n_units: int, steps: int, alignment: int = 1) -> list[int]:
    """Units removed at each level: `steps` even steps from none to all, each step's kept count rounded to the
    nearest multiple of `alignment` (ties to fewer kept; the full count is always allowed), deduplicated.
    With alignment 1 these are the plain ladder's counts (the nearest whole unit, half up), as before alignment
    existed. Integer arithmetic: a step's kept count times `steps` is n_units · (steps − level) exactly."""
    if steps < 1 or alignment < 1:
        raise ValueError("steps and alignment must be ≥ 1")
    removed = set()
    for level in range(steps + 1):
        target = n_units * (steps - level)  # the even kept count, scaled by `steps`
        below = target // (alignment * steps) * alignment
        widths = {width for width in (below, below + alignment, n_units) if width <= n_units}
        removed.add(n_units - min(widths, key=lambda width: (abs(width * steps - target), width)))
    return sorted(removed)


def even_group_ladder(layout: HeadLayout, steps: int) -> list[int]:
    """Query heads removed at each level when every KV group loses the same number: a plain ladder over one
    group's heads (SmolLM2, 3 per group: 0, 1, 2, 3), times the number of groups (0, 3, 6, 9 of 9 heads)."""
    return [per_group * layout.kv_heads for per_group in level_ladder(layout.group_size, steps)]


def check_mlp_alignment(alignment: int, width: int, layer: int) -> None:
    """A one-line DarwinLMError unless `alignment` divides the MLP `width` and leaves a level between the dense
    and the removed MLP."""
    if alignment == 1:
        return
    if width % alignment == 0 and alignment < width:
        return
    suggestion = math.gcd(width, 1 << (alignment.bit_length() - 1))  # a power of two dividing the width
    while suggestion > 1 and suggestion >= width:
        suggestion //= 2
    raise DarwinLMError(
        f"mlp_alignment {alignment} does not divide the MLP width {width} of layer {layer} into levels",
        f"set database.mlp_alignment to a divisor of {width} below it, e.g. {suggestion} (1: no alignment)")


def unit_columns(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Indices of the columns (or rows) of whole units, in unit order: a unit is `unit_size` consecutive ones
    (an attention head is head_dim columns of o_proj, an MLP channel one column of down_proj)."""
    return (units[:, None] * unit_size + torch.arange(unit_size, device=units.device)).flatten()


def scatter_units(weight: torch.Tensor, kept_units: torch.Tensor, n_units: int, unit_size: int) -> torch.Tensor:
    """Dense-width (d_out, n_units * unit_size) weight with `weight`'s columns at the kept units, zeros elsewhere."""
    full = torch.zeros(weight.shape[0], n_units * unit_size, dtype=weight.dtype, device=weight.device)
    full[:, unit_columns(kept_units.to(weight.device), unit_size)] = weight
    return full
