"""Apply: set a live model to a per-module level assignment by swapping tensors, never copying the model.

The dense tensors are kept aside once; every `apply` builds each changed module's linears from them (rows of
kept units) and from the database (OBS-updated output columns), physically shrunk so a pruned candidate runs
faster. A module at its last level (everything removed) is replaced by a no-op returning zeros, so a block
with both modules removed is the identity through its residual. `masked=True` keeps dense shapes with zeros
instead: slower, same function — used to check shrinking and for padded exports. A fused linear (Phi-3's
qkv_proj) is split into its parts once, and each apply stacks the parts' kept rows again (ArchSpec.fused).

Uneven GQA groups (query_heads mode can leave, say, 3/1/2 query heads on 3 KV heads) cannot be expressed with
one `num_key_value_groups`; such attention modules switch to the exported models' own forward, which maps
each query head to its KV head by index (modeling_pruned.set_uneven_groups), so search and export agree.
"""

from collections.abc import Mapping

import torch
from torch import nn

from darwinlm.core.model.arch import arch_for
from darwinlm.core.database.store import Database
from darwinlm.core.database.structure import ModuleShape, module_shapes, scatter_units, unit_columns


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=requires_grad)
    linear.out_features, linear.in_features = weight.shape


class LiveAssembly:
    """A live model plus its database; `apply(levels)` switches modules between levels in place."""

    def __init__(self, model: nn.Module, database: Database, base_model_digest: str | None = None):
        database.check_model(model, base_model_digest)
        self.model, self.database = model, database
        self.spec = arch_for(model)
        self.shapes = module_shapes(model, self.spec, database.manifest["config"]["gqa_mode"])
        self.blocks = self.spec.block_list(model)
        self.dense = [self._dense_tensors(block) for block in self.blocks]
        self.modules = {(i, "attn"): self.spec.attention_of(b) for i, b in enumerate(self.blocks)}
        self.modules.update({(i, "mlp"): self.spec.mlp_of(b) for i, b in enumerate(self.blocks)})
        self.levels = {key: 0 for key in self.modules}
        self.masked = False

    def _dense_tensors(self, block) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per logical projection (q_proj … down_proj), its dense (weight, bias); fused linears split into parts."""
        spec, layout = self.spec, self.spec.head_layout(self.model.config)
        attention, mlp = spec.attention_of(block), spec.mlp_of(block)
        down = mlp.get_submodule(spec.down_proj)
        rows = {"q_proj": layout.query_heads * layout.head_dim, "k_proj": layout.kv_heads * layout.head_dim,
                "v_proj": layout.kv_heads * layout.head_dim, "gate_proj": down.in_features, "up_proj": down.in_features}
        tensors = {"o_proj": attention.get_submodule(spec.o_proj), "down_proj": down}
        tensors = {name: (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
                   for name, lin in tensors.items()}
        for module, kind in ((attention, "attn"), (mlp, "mlp")):
            for linear, parts in spec.input_linears(module, kind):
                sizes = [rows[part] for part in parts]
                weights = linear.weight.detach().clone().split(sizes)
                biases = [None] * len(parts) if linear.bias is None else linear.bias.detach().clone().split(sizes)
                tensors.update(zip(parts, zip(weights, biases)))
        return tensors

    def _set_inputs(self, module, kind: str, tensors: dict) -> None:
        """Set a module's input linears from per-projection (weight, bias), stacking the parts of fused ones."""
        for linear, parts in self.spec.input_linears(module, kind):
            weight = torch.cat([tensors[part][0] for part in parts])
            bias = None if linear.bias is None else torch.cat([tensors[part][1] for part in parts])
            _set_linear(linear, weight, bias)

    def apply(self, levels: Mapping[tuple[int, str], int], masked: bool = False, rebuild: bool = False) -> None:
        """Set each (layer, kind) in `levels` to that level; modules not named keep their current level.

        `rebuild=True` rebuilds every module from the dense copy and the database, discarding any training
        the live weights received since the last apply.
        """
        if masked != self.masked or rebuild:  # a new representation, or weights that drifted: rebuild all
            self.masked, changed = masked, {**self.levels, **levels}
        else:
            changed = {key: level for key, level in levels.items() if self.levels.get(key) != level}
        for (layer, kind), level in changed.items():
            n_levels = self.database.num_levels(layer, kind)
            if not 0 <= level < n_levels:
                raise ValueError(f"level {level} out of range 0..{n_levels - 1} for ({layer}, {kind})")
            self._set_module(layer, kind, level)
            self.levels[(layer, kind)] = level

    def kept_params(self) -> int:
        return sum(self.database.params(layer, kind, level) for (layer, kind), level in self.levels.items())

    def _set_module(self, layer: int, kind: str, level: int) -> None:
        shape: ModuleShape = self.shapes[layer][kind]
        block, module = self.blocks[layer], self.modules[(layer, kind)]
        attribute = self.spec.attention if kind == "attn" else self.spec.mlp
        last_level = level == self.database.num_levels(layer, kind) - 1
        if last_level and not self.masked:
            # imported here: model.pruned imports transformers (and so huggingface_hub), which importing the
            # search or the config must not do before an entry point has set the offline defaults
            from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP

            setattr(block, attribute, ZeroAttention(layer) if kind == "attn" else ZeroMLP())
            return
        if level == 0:
            kept, out_weight = torch.arange(shape.n_units), self.dense[layer]["o_proj" if kind == "attn" else "down_proj"][0]
        else:
            pruned = self.database.load(layer, kind, level)  # before touching the model: a bad shard changes nothing
            kept, out_weight = pruned.kept_units, pruned.weight
        setattr(block, attribute, module)
        # Always a copy: training the live model must never write into the dense copy or the database cache.
        dense_q = self.dense[layer]["q_proj"][0]
        out_weight = out_weight.to(device=dense_q.device, dtype=dense_q.dtype, copy=True)
        if kind == "mlp":
            self._set_mlp(layer, module, kept, out_weight, shape)
        else:
            self._set_attention(layer, module, kept, out_weight, shape)

    def _set_mlp(self, layer, mlp, kept, down_weight, shape: ModuleShape) -> None:
        dense, spec = self.dense[layer], self.spec
        rows = kept if not self.masked else torch.arange(shape.n_units)
        inputs = {}
        for name in ("gate_proj", "up_proj"):
            weight, bias = dense[name]
            weight, bias = weight[rows], None if bias is None else bias[rows]
            if self.masked:
                weight, bias = _zero_rows_except(weight, kept), None if bias is None else _zero_rows_except(bias, kept)
            inputs[name] = (weight, bias)
        self._set_inputs(mlp, "mlp", inputs)
        if self.masked:
            down_weight = scatter_units(down_weight, kept, shape.n_units, 1)
        _set_linear(mlp.get_submodule(spec.down_proj), down_weight, dense["down_proj"][1])

    def _set_attention(self, layer, attention, kept, o_weight, shape: ModuleShape) -> None:
        dense, spec, layout = self.dense[layer], self.spec, shape.layout
        heads = shape.query_heads_of(kept)
        kv_of_query = None
        if self.masked:
            q_heads, kv_heads = torch.arange(layout.query_heads), torch.arange(layout.kv_heads)
            o_weight = scatter_units(o_weight, heads, layout.query_heads, layout.head_dim)
        else:
            kv_of_head = heads // layout.group_size
            kv_heads, counts = torch.unique(kv_of_head, return_counts=True)
            q_heads = heads
            if not bool((counts == counts[0]).all()):
                if spec.index_mapped_attention:
                    kv_of_query = torch.searchsorted(kv_heads, kv_of_head).tolist()
                else:  # exact for any forward that repeats KV heads, at the cost of duplicated K/V rows
                    kv_heads = kv_of_head
        q_weight, q_bias = _head_rows(*dense["q_proj"], q_heads, layout.head_dim)
        if self.masked:
            q_weight = _zero_rows_except(q_weight, unit_columns(heads, layout.head_dim))
            q_bias = None if q_bias is None else _zero_rows_except(q_bias, unit_columns(heads, layout.head_dim))
        inputs = {"q_proj": (q_weight, q_bias)}
        inputs.update({name: _head_rows(*dense[name], kv_heads, layout.head_dim) for name in ("k_proj", "v_proj")})
        self._set_inputs(attention, "attn", inputs)
        _set_linear(attention.get_submodule(spec.o_proj), o_weight, dense["o_proj"][1])
        from darwinlm.core.model.pruned import set_attention_widths  # lazily: see above

        set_attention_widths(attention, len(q_heads), len(kv_heads), kv_of_query)


def _head_rows(weight, bias, heads, head_dim):
    rows = unit_columns(heads, head_dim)
    return weight[rows], None if bias is None else bias[rows]


def _zero_rows_except(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    mask[keep] = True
    return tensor * mask.view(-1, *[1] * (tensor.dim() - 1)).to(tensor.dtype)
