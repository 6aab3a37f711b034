"""What a unit is in each prunable module, which heads survive, and what a level costs in parameters.

Prunable modules are each block's attention ("attn") and MLP ("mlp"). Units are input-column groups of their
output projection (o_proj, down_proj); removing a unit also removes the rows that feed it (q/k/v, gate/up).

GQA: query head h reads KV head h // group_size. Two unit choices, recorded in the database manifest:
  * "query_heads": a unit is one query head; k/v stay, except a KV head with no query head left is dropped;
  * "kv_groups": a unit is one KV head with its whole group of query heads.
"""

from dataclasses import dataclass

import torch
from torch import nn

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


def level_ladder(n_units: int, steps: int) -> list[int]:
    """Units removed at each level: `steps` even steps from none to all, rounded to whole units, deduplicated."""
    if steps < 1:
        raise ValueError("steps must be ≥ 1")
    return sorted({int(level * n_units / steps + 0.5) for level in range(steps + 1)})


def unit_columns(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Indices of the columns (or rows) of whole units, in unit order: a unit is `unit_size` consecutive ones
    (an attention head is head_dim columns of o_proj, an MLP channel one column of down_proj)."""
    return (units[:, None] * unit_size + torch.arange(unit_size, device=units.device)).flatten()


def scatter_units(weight: torch.Tensor, kept_units: torch.Tensor, n_units: int, unit_size: int) -> torch.Tensor:
    """Dense-width (d_out, n_units * unit_size) weight with `weight`'s columns at the kept units, zeros elsewhere."""
    full = torch.zeros(weight.shape[0], n_units * unit_size, dtype=weight.dtype, device=weight.device)
    full[:, unit_columns(kept_units.to(weight.device), unit_size)] = weight
    return full
