"""Modeling code for pruned models whose layers differ in width (copied verbatim into every export).

This file imports only torch and transformers — never darwinlm — so an exported folder loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where darwinlm is not installed. darwinlm
registers these classes on request, so after `darwinlm.core.register_pruned_classes()` a plain `from_pretrained(dir)`
works too.

A pruned config is the family's own config plus per-layer lists:
    layer_query_heads, layer_kv_heads, layer_intermediate_sizes  (0 = module removed: a no-op)
    layer_kv_of_query  (per layer, the KV head each kept query head reads, or null when groups are even)
    layer_o_proj_bias, layer_down_proj_bias  (per layer, whether that output projection has a bias, or null for
        the family's own: a pruning method that folds removed units' mean output into a bias, as FLAP does, needs
        one where the family has none)
Each decoder layer is built dense by the family's class and then re-shaped to its own widths; fused linears
(Phi-3's qkv_proj, gate_up_proj) keep their layout, each part shrunk to the layer's widths (INPUT_ROWS).
"""

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PER_LAYER_FIELDS = ("layer_query_heads", "layer_kv_heads", "layer_intermediate_sizes", "layer_kv_of_query",
                    "layer_o_proj_bias", "layer_down_proj_bias")


class ZeroAttention(nn.Module):
    """Attention with every head removed: adds nothing to the residual stream.

    Under a KV cache it still records one 1-wide placeholder per token, because the cache reads the sequence
    length (and so the positions of new tokens) from the keys it holds for a layer.
    """

    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """An MLP with every channel removed."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def uneven_group_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """The family attention forward, for query heads spread unevenly over KV heads.

    `self.kv_of_query` (a list, one entry per query head) picks each query head's KV head after the cache
    update, so the cache stays compact and the attention kernel sees plain multi-head attention. It is a
    list, not a buffer, because from_pretrained builds modules on the meta device and never fills buffers
    that are not in the checkpoint; the index tensor is made on first use on the activations' device.
    """
    kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    index = self.__dict__.get("_kv_index")
    if index is None or index.device != key.device:
        index = self._kv_index = torch.tensor(self.kv_of_query, dtype=torch.long, device=key.device)
    key, value = key.index_select(1, index), value.index_select(1, index)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(
        self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
        sliding_window=getattr(self, "sliding_window", None), **kwargs,
    )
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def set_uneven_groups(attention: nn.Module, kv_of_query: list[int] | None) -> None:
    """Switch an attention module to (or back from) uneven query-per-KV groups."""
    for name in ("forward", "kv_of_query", "_kv_index"):
        attention.__dict__.pop(name, None)
    if kv_of_query is None:
        return
    attention.kv_of_query = [int(kv) for kv in kv_of_query]
    attention.num_key_value_groups = 1
    attention.forward = uneven_group_forward.__get__(attention)


class LayerConfig:
    """One attention's view of its model's config, with that layer's own head counts.

    Phi-3's attention reads its query width from `config.num_attention_heads`, a number every layer shares;
    a pruned attention reads this view instead. Everything else (the attention implementation included) is
    read from, and written to, the model's config as it is at that moment.
    """

    def __init__(self, base, **overrides):
        vars(self).update(overrides, base=base)

    def __getattr__(self, name):
        if name.startswith("__") or name == "base":  # copy/pickle probe dunders before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.base, name)

    def __setattr__(self, name, value):
        if name in vars(self):
            vars(self)[name] = value
        else:
            setattr(self.base, name, value)


def set_attention_widths(attention: nn.Module, query_heads: int, kv_heads: int, kv_of_query: list[int] | None = None):
    """Tell an attention module (already holding weights of these widths) its query and KV head counts."""
    base = vars(attention.config).get("base", attention.config)
    attention.config = LayerConfig(base, num_attention_heads=query_heads, num_key_value_heads=kv_heads)
    attention.num_key_value_heads = kv_heads
    set_uneven_groups(attention, kv_of_query)
    if kv_of_query is None:
        attention.num_key_value_groups = query_heads // kv_heads


# The rows of each input linear a family may have: a fused linear (Phi-3) stacks several blocks of rows.
# The ArchSpec registry says the same for live models; this file must not import darwinlm, so it says it again.
INPUT_ROWS = {"q_proj": ("query",), "k_proj": ("kv",), "v_proj": ("kv",), "qkv_proj": ("query", "kv", "kv"),
              "gate_proj": ("width",), "up_proj": ("width",), "gate_up_proj": ("width", "width")}


def _resize_linear(linear: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    """A new linear of the given shape; `bias` None keeps whether `linear` has one."""
    return nn.Linear(in_features, out_features, bias=linear.bias is not None if bias is None else bias,
                     device=linear.weight.device, dtype=linear.weight.dtype)


def _resize_module(module: nn.Module, rows: dict[str, int], hidden: int, output: str, width: int,
                   output_bias: bool | None = None) -> None:
    """Resize a module's input linears to `rows` (per row kind) and its output linear to `width` inputs (with a
    bias if `output_bias`; None: as the family builds it)."""
    for name, child in list(module.named_children()):
        if name in INPUT_ROWS:
            setattr(module, name, _resize_linear(child, hidden, sum(rows[kind] for kind in INPUT_ROWS[name])))
    setattr(module, output, _resize_linear(getattr(module, output), width, hidden, output_bias))


def reshape_decoder_layers(model: nn.Module, config) -> None:
    """Give every decoder layer of a freshly built dense model the widths listed in `config`."""
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = len(model.model.layers)
    kv_maps = config.layer_kv_of_query or [None] * layers
    o_biases = getattr(config, "layer_o_proj_bias", None) or [None] * layers
    down_biases = getattr(config, "layer_down_proj_bias", None) or [None] * layers
    for index, layer in enumerate(model.model.layers):
        query_heads, kv_heads = config.layer_query_heads[index], config.layer_kv_heads[index]
        if query_heads == 0:
            layer.self_attn = ZeroAttention(index)
        else:
            rows = {"query": query_heads * head_dim, "kv": kv_heads * head_dim}
            _resize_module(layer.self_attn, rows, hidden, "o_proj", query_heads * head_dim, o_biases[index])
            set_attention_widths(layer.self_attn, query_heads, kv_heads, kv_maps[index])
        width = config.layer_intermediate_sizes[index]
        if width == 0:
            layer.mlp = ZeroMLP()
        else:
            _resize_module(layer.mlp, {"width": width}, hidden, "down_proj", width, down_biases[index])


def _init_per_layer(config, layer_query_heads, layer_kv_heads, layer_intermediate_sizes, layer_kv_of_query,
                    layer_o_proj_bias=None, layer_down_proj_bias=None):
    layers = config.num_hidden_layers
    config.layer_query_heads = list(layer_query_heads or [config.num_attention_heads] * layers)
    config.layer_kv_heads = list(layer_kv_heads or [config.num_key_value_heads] * layers)
    config.layer_intermediate_sizes = list(layer_intermediate_sizes or [config.intermediate_size] * layers)
    config.layer_kv_of_query = layer_kv_of_query
    config.layer_o_proj_bias = layer_o_proj_bias
    config.layer_down_proj_bias = layer_down_proj_bias


class _PerLayerWidthsConfig:
    """Mixed in before a family's config class: the same config plus the per-layer width lists."""

    def __init__(self, layer_query_heads=None, layer_kv_heads=None, layer_intermediate_sizes=None,
                 layer_kv_of_query=None, layer_o_proj_bias=None, layer_down_proj_bias=None, **kwargs):
        super().__init__(**kwargs)
        _init_per_layer(self, layer_query_heads, layer_kv_heads, layer_intermediate_sizes, layer_kv_of_query,
                        layer_o_proj_bias, layer_down_proj_bias)


class _ReshapedLayersModel:
    """Mixed in before a family's *ForCausalLM: build dense, then give each layer its configured widths."""

    def __init__(self, config):
        super().__init__(config)
        reshape_decoder_layers(self, config)


class PrunedLlamaConfig(_PerLayerWidthsConfig, LlamaConfig):
    model_type = "darwinlm_llama"


class PrunedMistralConfig(_PerLayerWidthsConfig, MistralConfig):
    model_type = "darwinlm_mistral"


class PrunedQwen2Config(_PerLayerWidthsConfig, Qwen2Config):
    model_type = "darwinlm_qwen2"


class PrunedGemma3TextConfig(_PerLayerWidthsConfig, Gemma3TextConfig):
    model_type = "darwinlm_gemma3_text"


class PrunedQwen3Config(_PerLayerWidthsConfig, Qwen3Config):
    model_type = "darwinlm_qwen3"


class PrunedPhi3Config(_PerLayerWidthsConfig, Phi3Config):
    model_type = "darwinlm_phi3"


class PrunedLlamaForCausalLM(_ReshapedLayersModel, LlamaForCausalLM):
    config_class = PrunedLlamaConfig


class PrunedMistralForCausalLM(_ReshapedLayersModel, MistralForCausalLM):
    config_class = PrunedMistralConfig


class PrunedQwen2ForCausalLM(_ReshapedLayersModel, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config


class PrunedGemma3ForCausalLM(_ReshapedLayersModel, Gemma3ForCausalLM):
    config_class = PrunedGemma3TextConfig


class PrunedQwen3ForCausalLM(_ReshapedLayersModel, Qwen3ForCausalLM):
    config_class = PrunedQwen3Config


class PrunedPhi3ForCausalLM(_ReshapedLayersModel, Phi3ForCausalLM):
    config_class = PrunedPhi3Config


# base model_type → (pruned config class, pruned model class)
PRUNED_CLASSES = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "gemma3_text": (PrunedGemma3TextConfig, PrunedGemma3ForCausalLM),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "phi3": (PrunedPhi3Config, PrunedPhi3ForCausalLM),
}
