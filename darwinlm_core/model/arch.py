"""The architecture registry: one ArchSpec per model family, looked up by `config.model_type`.

Everything that differs between families lives here, as data: where the decoder blocks are, which linears form
attention and the MLP, and how heads group under KV heads. The driver, the pruner and the exporter read an
ArchSpec and never branch on the model type themselves. Adding a family is one `register_arch(...)` call.
"""

from dataclasses import dataclass

from torch import nn

from darwinlm.core.errors import DarwinLMError

# The logical input projections of each prunable module, in the row order a fused linear stacks them.
INPUT_PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Fused:
    """One linear whose output rows stack several logical projections in order: Phi-3's qkv_proj is q; k; v.

    Each part keeps its own rows (query heads × head_dim, KV heads × head_dim, or MLP channels), so pruning a
    fused linear is pruning its parts and stacking the kept rows again.
    """

    path: str  # the fused linear, relative to its module (attention or MLP)
    parts: tuple[str, ...]  # logical projection names (ArchSpec field names), in row order


@dataclass(frozen=True)
class ArchSpec:
    """Where things live inside a `*ForCausalLM` of one family (dotted attribute paths)."""

    family: str
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"  # relative to a block
    mlp: str = "mlp"  # relative to a block
    q_proj: str = "q_proj"  # relative to the attention module
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"  # relative to the MLP module
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Uneven query-per-KV groups run through modeling_pruned's index-mapped attention, written for the
    # Llama-style forward. Families with another forward get a private copy of its KV head per query head.
    index_mapped_attention: bool = True
    fused: tuple[Fused, ...] = ()

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def attention_of(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attention)

    def mlp_of(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp)

    def input_linears(self, module: nn.Module, kind: str) -> list[tuple[nn.Linear, tuple[str, ...]]]:
        """The linears feeding a module's units ("attn" or "mlp"), each with the logical projections it holds,
        in INPUT_PROJECTIONS order: [(q_proj, ("q_proj",)), ...] or, fused, [(qkv_proj, ("q_proj", "k_proj", "v_proj"))]."""
        groups, seen = [], set()
        for name in INPUT_PROJECTIONS[kind]:
            fused = next((f for f in self.fused if name in f.parts), None)
            if fused is None:
                groups.append((module.get_submodule(getattr(self, name)), (name,)))
            elif fused.path not in seen:
                seen.add(fused.path)
                groups.append((module.get_submodule(fused.path), fused.parts))
        return groups

    def head_layout(self, config) -> "HeadLayout":
        """Query heads, KV heads and head size from a config (shared by every registered family so far)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return HeadLayout(query_heads=heads, kv_heads=kv_heads, head_dim=head_dim)


@dataclass(frozen=True)
class HeadLayout:
    """Attention shape of one block: query head h reads KV head h // (query_heads // kv_heads)."""

    query_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.query_heads // self.kv_heads


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *model_types: str) -> ArchSpec:
    """Make `spec` the ArchSpec of each `config.model_type` in `model_types`."""
    for model_type in model_types or (spec.family,):
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def arch_for(model_or_config) -> ArchSpec:
    """The ArchSpec of a model (or its config); a clear error for families darwinlm cannot prune yet."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise DarwinLMError(
            f"unsupported architecture '{model_type}'",
            f"darwinlm can prune {', '.join(supported_model_types())}; "
            "add an ArchSpec with register_arch() in darwinlm_core/model/arch.py",
        )
    return _REGISTRY[model_type]


# Llama, Mistral and Qwen2 share module names; Qwen2's q/k/v biases need no entry because pruning slices any
# bias a projection has, and Mistral/Qwen2 sliding windows arrive in the per-block kwargs the driver records.
# Exported pruned models (modeling_pruned.py) keep their family's module layout, so they can be loaded,
# evaluated and driven like it; their per-layer widths come from the modules, not from head_layout().
register_arch(ArchSpec(family="llama"), "llama", "darwinlm_llama")
register_arch(ArchSpec(family="mistral"), "mistral", "darwinlm_mistral")
register_arch(ArchSpec(family="qwen2"), "qwen2", "darwinlm_qwen2")
# Gemma 3 (text) uses the same names. Its extra norms (q/k norms over head_dim, shared by every head; the
# post-attention and post-feedforward norms, which map a removed module's zeros to zeros) need no entry.
# Uneven groups become a KV copy per query head, so a pruned Gemma export never needs kv_of_query (whose
# forward is Llama's, without Gemma's q/k norms).
register_arch(ArchSpec(family="gemma3_text", index_mapped_attention=False), "gemma3_text", "darwinlm_gemma3_text")
# Qwen3 is Gemma 3's case: q/k norms over head_dim shared by every head, so pruning heads leaves them as they are,
# and uneven groups take a KV copy per query head. Llama 3.x is model_type "llama"; its rope_parameters
# (rope_type "llama3") live in the config, which the driver's recorded cos/sin and the export both carry.
register_arch(ArchSpec(family="qwen3", index_mapped_attention=False), "qwen3", "darwinlm_qwen3")
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (its MLP splits the rows in two halves). Its
# attention splits qkv by head counts (modeling_pruned.set_attention_widths), so uneven groups copy KV heads.
register_arch(
    ArchSpec(family="phi3", index_mapped_attention=False,
             fused=(Fused("qkv_proj", ("q_proj", "k_proj", "v_proj")), Fused("gate_up_proj", ("gate_proj", "up_proj")))),
    "phi3", "darwinlm_phi3",
)
