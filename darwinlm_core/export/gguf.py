"""Export a pruned (or dense) llama / mistral / qwen2 model as ONE GGUF file that a stock llama.cpp runs.

llama.cpp's `deci` architecture (src/models/deci.cpp) reads the query heads, KV heads and FFN width of every
layer from per-layer arrays, so a model whose layers differ in width keeps its size and speed there. How a
pruned model maps onto it (checked in llama.cpp's source as vendored by llama-cpp-python 0.3.36):
- removed attention: n_head 0 and no attention tensors — except in layer 0, because the loader reads the head
  size only when n_head(0) > 0; there it is one query + one KV head with zero weights (adds exactly zero);
- removed MLP: a 1-wide FFN with zero weights, because `n_ff == 0` makes the graph `continue` before the
  residual add and so drops that layer's attention output too; n_ff 0 only when the whole layer is removed,
  and never in the last layer, whose FFN branch is where the rows to output are picked (skipping it leaves
  that input unused and llama.cpp aborts with GGML_ASSERT(buffer));
- uneven query-per-KV groups (`kv_of_query`): llama.cpp needs query head h to read KV head h // r for one r per
  layer, so KV heads are duplicated (and a group may get zero query heads as padding) until groups are even;
- q/k rows are permuted per head from Hugging Face's rotate-half RoPE layout to llama.cpp's pairwise one;
- head size, value size and RoPE width are written explicitly (else derived from layer 0's head count).
The tokenizer (byte-level BPE, as SmolLM2, Llama 3 and Qwen2 use) and the chat template travel inside.
Quantization: f32 / f16 / q8_0 by the `gguf` package here; q4_k_m by llama.cpp's own quantizer (llama-cpp-python),
since gguf 0.19 can read Q4_K but not write it. The file is written under a temporary name and renamed, so a
failed export leaves no partial file.
"""

import ctypes
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

from darwinlm.core import uri_io
from darwinlm.core.model.arch import arch_for
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP

GGUF_FAMILIES = ("llama", "mistral", "qwen2")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_* values
_Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values; other rows stay F16, as convert_hf_to_gguf does

# Byte-level BPE pre-tokenizers of tokenizer.json → llama.cpp's name for the same split (src/llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer becomes in the GGUF.

    query_heads: per GGUF query head, the source query head it copies, or None for a zero padding head.
    kv_heads: per GGUF KV head, the source KV head it copies; query head h reads KV head h // group.
    ffn: "keep" (the pruned MLP), "zero" (1-wide zero FFN) or "none" (whole layer removed, n_ff 0).
    ffn_width: the layer's n_ff in the GGUF (the kept width, 1 or 0).
    zero_attention: one query + one KV head of zeros (layer 0 without attention, see the module docstring).
    """

    query_heads: tuple
    kv_heads: tuple
    ffn: str
    ffn_width: int
    zero_attention: bool = False

    @property
    def n_head(self) -> int:
        return len(self.query_heads)

    @property
    def n_head_kv(self) -> int:
        return len(self.kv_heads)


def even_groups(kv_of_query: list[int]) -> tuple[tuple, tuple]:
    """(query_heads, kv_heads) in llama.cpp's even layout for query heads reading KV heads `kv_of_query`.

    Each source KV group of g query heads is cut into ceil(g / r) GGUF groups of r heads (the last padded
    with zero heads), each with its own copy of the KV head. r is chosen to minimise q + o + k + v rows.
    """
    members: dict[int, list[int]] = {}
    for query, kv in enumerate(kv_of_query):
        members.setdefault(int(kv), []).append(query)
    best = None
    for r in range(1, max(len(m) for m in members.values()) + 1):
        kv_count = sum(-(-len(m) // r) for m in members.values())
        cost = kv_count * r + kv_count  # query heads (q and o rows) + KV heads (k and v rows), in head units
        if best is None or cost < best[0]:
            best = (cost, r)
    r = best[1]
    query_heads, kv_heads = [], []
    for kv, queries in sorted(members.items()):
        for start in range(0, len(queries), r):
            chunk = queries[start:start + r]
            query_heads += chunk + [None] * (r - len(chunk))
            kv_heads.append(kv)
    return tuple(query_heads), tuple(kv_heads)


def plan_layer(spec, block, index: int, head_dim: int, last: bool = False) -> LayerPlan:
    """The LayerPlan of decoder block `block` (a live, possibly shrunk module of family `spec`); `last`: it is
    the model's last layer."""
    attention, mlp = spec.attention_of(block), spec.mlp_of(block)
    if isinstance(attention, ZeroAttention):
        query_heads, kv_heads, zero = ((None,), (None,), True) if index == 0 else ((), (), False)
    else:
        n_query = attention.get_submodule(spec.q_proj).out_features // head_dim
        n_kv = attention.get_submodule(spec.k_proj).out_features // head_dim
        kv_of_query = getattr(attention, "kv_of_query", None) or [q // (n_query // n_kv) for q in range(n_query)]
        query_heads, kv_heads = even_groups(kv_of_query)
        zero = False
    if not isinstance(mlp, ZeroMLP):
        ffn, width = "keep", mlp.get_submodule(spec.gate_proj).out_features
    else:
        ffn, width = ("zero", 1) if query_heads or last else ("none", 0)
    return LayerPlan(query_heads=query_heads, kv_heads=kv_heads, ffn=ffn, ffn_width=width, zero_attention=zero)


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q_proj/k_proj (heads·head_dim, ...) from HF's rotate-half order to llama.cpp's pairwise order.

    Per head, rows [0, d/2) and [d/2, d) are interleaved (the permute of convert_hf_to_gguf's LlamaModel);
    works on weights (rows, hidden) and biases (rows,) alike.
    """
    if heads == 0:
        return weight
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rows(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _pick_heads(matrix: np.ndarray, heads: tuple, head_dim: int) -> np.ndarray:
    """Rows (len(heads)·head_dim, ...) of `matrix` (source heads·head_dim, ...): head per entry, None → zeros."""
    blocks = [np.zeros((head_dim, *matrix.shape[1:]), np.float32) if head is None
              else matrix[head * head_dim:(head + 1) * head_dim] for head in heads]
    return np.concatenate(blocks, axis=0)


def attention_tensors(spec, block, plan: LayerPlan, head_dim: int, hidden: int) -> dict[str, np.ndarray]:
    """GGUF attention tensors of one layer (name suffix → float32 array, PyTorch (out, in) layout)."""
    if not plan.query_heads:
        return {}
    norm = _rows(block.input_layernorm.weight)
    if plan.zero_attention:
        zeros = np.zeros((head_dim, hidden), np.float32)
        return {"attn_norm.weight": norm, "attn_q.weight": zeros, "attn_k.weight": zeros,
                "attn_v.weight": zeros, "attn_output.weight": zeros.T.copy()}
    attention = spec.attention_of(block)
    tensors = {"attn_norm.weight": norm}
    for name, projection, heads, rope in (("attn_q", spec.q_proj, plan.query_heads, True),
                                          ("attn_k", spec.k_proj, plan.kv_heads, True),
                                          ("attn_v", spec.v_proj, plan.kv_heads, False)):
        linear = attention.get_submodule(projection)
        for kind, value in (("weight", linear.weight), ("bias", linear.bias)):
            if value is None:
                continue
            rows = _pick_heads(_rows(value), heads, head_dim)
            tensors[f"{name}.{kind}"] = rope_permute(rows, len(heads)) if rope else rows
    output = attention.get_submodule(spec.o_proj)
    tensors["attn_output.weight"] = _pick_heads(_rows(output.weight).T, plan.query_heads, head_dim).T.copy()
    if output.bias is not None:
        tensors["attn_output.bias"] = _rows(output.bias)
    return tensors


def ffn_tensors(spec, block, plan: LayerPlan, hidden: int) -> dict[str, np.ndarray]:
    """GGUF FFN tensors of one layer: the kept MLP, a 1-wide zero FFN, or nothing (layer removed)."""
    if plan.ffn == "none":
        return {}
    tensors = {"ffn_norm.weight": _rows(block.post_attention_layernorm.weight)}
    if plan.ffn == "zero":
        zeros = np.zeros((1, hidden), np.float32)
        return {**tensors, "ffn_gate.weight": zeros, "ffn_up.weight": zeros, "ffn_down.weight": zeros.T.copy()}
    mlp = spec.mlp_of(block)
    for name, projection in (("ffn_gate", spec.gate_proj), ("ffn_up", spec.up_proj), ("ffn_down", spec.down_proj)):
        linear = mlp.get_submodule(projection)
        tensors[f"{name}.weight"] = _rows(linear.weight)
        if linear.bias is not None:
            tensors[f"{name}.bias"] = _rows(linear.bias)
    return tensors


def check_gguf_quant(quant: str) -> None:
    if quant not in GGUF_QUANTS:
        raise DarwinLMError(f"unknown GGUF quant type '{quant}'", f"use one of {', '.join(GGUF_QUANTS)}")


def check_gguf_exportable(model_or_config, quant: str) -> str:
    """The base family of a model (or its config), or a one-line DarwinLMError for a family, setting or quant
    type this export cannot do. Needs no weights, so the CLI calls it before loading any."""
    check_gguf_quant(quant)
    family = arch_for(model_or_config).family
    if family not in GGUF_FAMILIES:
        raise DarwinLMError(
            f"GGUF export cannot express the '{family}' family: llama.cpp's per-layer `deci` architecture has "
            f"the Llama layer only (GGUF export: {', '.join(GGUF_FAMILIES)})",
            "export with --format compact and run the model in transformers",
        )
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise DarwinLMError(f"GGUF export needs a SiLU MLP, this model uses {config.hidden_act}")
    if family == "qwen2" and getattr(config, "use_sliding_window", False):
        raise DarwinLMError("GGUF export of a Qwen2 model with use_sliding_window=true is not supported",
                            "deci has no sliding-window attention")
    if has_added_output_bias(model_or_config):
        raise DarwinLMError("GGUF export cannot carry an output-projection bias the family lacks (FLAP's compensation)",
                            "export with --format compact and run the model in transformers")
    return family


def has_added_output_bias(model_or_config) -> bool:
    """Whether an o_proj / down_proj has a bias its family's config does not build (attention_bias, mlp_bias): a
    pruned config's per-layer flags, or a live model's modules. llama.cpp's deci graph was not checked for them."""
    config = getattr(model_or_config, "config", model_or_config)
    allowed = {"attn": getattr(config, "attention_bias", False), "mlp": getattr(config, "mlp_bias", False)}
    if not hasattr(model_or_config, "config"):
        flags = {"attn": getattr(config, "layer_o_proj_bias", None), "mlp": getattr(config, "layer_down_proj_bias", None)}
        return any(any(flags[kind] or []) and not allowed[kind] for kind in flags)
    spec = arch_for(model_or_config)
    for block in spec.block_list(model_or_config):
        for kind, module, name in (("attn", spec.attention_of(block), spec.o_proj), ("mlp", spec.mlp_of(block), spec.down_proj)):
            if isinstance(module, (ZeroAttention, ZeroMLP)) or allowed[kind]:
                continue
            if module.get_submodule(name).bias is not None:
                return True
    return False


def _rope_metadata(config, head_dim: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(RoPE keys for the writer, extra tensors): default, linear and llama3 RoPE scaling."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    keys = {"freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return keys, {}
    if kind == "linear":
        return {**keys, "linear_factor": float(rope["factor"])}, {}
    if kind != "llama3":
        raise DarwinLMError(f"GGUF export does not handle rope_type '{kind}'", "supported: default, linear, llama3")
    # llama3 scaling as per-frequency factors (the same computation as convert_hf_to_gguf's DeciModel)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (keys["freq_base"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return keys, {"rope_freqs.weight": np.asarray(factors, np.float32)}


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or a DarwinLMError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        names = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
        if pattern in names:
            return names[pattern]
    raise DarwinLMError(f"GGUF export does not know llama.cpp's equivalent of this tokenizer's pre-tokenizer "
                        f"({'+'.join(str(kind) for kind in kinds) or 'none'})",
                        "byte-level BPE tokenizers of GPT-2, SmolLM2, Llama 3 and Qwen2 style are supported")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write `tokenizer` (a fast byte-level BPE tokenizer) with its special tokens and chat template."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="darwinlm-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        tokenizer_json = json.loads(path.read_text()) if path.is_file() else {}
        if tokenizer_json.get("model", {}).get("type") != "BPE" or tokenizer_json["model"].get("byte_fallback"):
            raise DarwinLMError("GGUF export supports byte-level BPE tokenizers only "
                                "(SentencePiece-style tokenizers such as Llama 2's are not covered yet)")
        pre = _pre_tokenizer_name(tokenizer_json)
        vocab = tokenizer.get_vocab()
        if max(vocab.values()) >= vocab_size:
            raise DarwinLMError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                                f"{vocab_size} embeddings", "export the tokenizer the model was trained with")
        by_id = {index: text for text, index in vocab.items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(vocab_size):
            if index not in by_id:
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            elif index in added:
                tokens.append(by_id[index])
                types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[index])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _hyperparameters(writer, config, plans: list[LayerPlan], head_dim: int, rope: dict, quant: str) -> None:
    # deci has no sliding-window attention: a Mistral-style window becomes the trained context, so llama.cpp
    # warns when asked for a longer one instead of silently attending further than the model was trained to
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    writer.add_context_length(int(min(config.max_position_embeddings, window or config.max_position_embeddings)))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(plans))
    writer.add_head_count([plan.n_head for plan in plans])
    writer.add_head_count_kv([plan.n_head_kv for plan in plans])
    writer.add_feed_forward_length([plan.ffn_width for plan in plans])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["freq_base"])
    if "linear_factor" in rope:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["linear_factor"])
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_FILE_TYPES["f16" if quant == "q4_k_m" else quant])


def model_tensors(model, plans: list[LayerPlan], head_dim: int) -> dict[str, np.ndarray]:
    """Every GGUF tensor name → float32 array in PyTorch layout (the writer stores it as GGUF expects)."""
    spec, hidden = arch_for(model), model.config.hidden_size
    tensors = {"token_embd.weight": _rows(model.get_input_embeddings().weight),
               "output_norm.weight": _rows(model.get_submodule(spec.final_norm).weight)}
    if not getattr(model.config, "tie_word_embeddings", False):  # tied: llama.cpp reuses token_embd
        tensors["output.weight"] = _rows(model.get_submodule(spec.lm_head).weight)
    for index, (block, plan) in enumerate(zip(spec.block_list(model), plans)):
        layer = {**attention_tensors(spec, block, plan, head_dim, hidden), **ffn_tensors(spec, block, plan, hidden)}
        tensors.update({f"blk.{index}.{name}": value for name, value in layer.items()})
    return tensors


def _encode(array: np.ndarray, quant: str):
    """(data, raw GGML type or None) for one tensor: 1-D tensors stay F32, as llama.cpp expects."""
    import gguf

    if array.ndim == 1 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "q8_0" and array.shape[-1] % _Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return array.astype(np.float16), None


def _write_file(model, tokenizer, path: Path, quant: str, metadata: dict | None) -> None:
    """Write the GGUF at `path` (f32, f16 or q8_0)."""
    import gguf

    spec, config = arch_for(model), model.config
    head_dim = spec.head_layout(config).head_dim
    blocks = spec.block_list(model)
    plans = [plan_layer(spec, block, index, head_dim, last=index == len(blocks) - 1)
             for index, block in enumerate(blocks)]
    rope, extra = _rope_metadata(config, head_dim)
    writer = gguf.GGUFWriter(str(path), arch="deci")
    writer.add_name(str((metadata or {}).get("name", "darwinlm-pruned")))
    if metadata:
        writer.add_string("darwinlm.metadata", json.dumps(metadata, default=str))
    _hyperparameters(writer, config, plans, head_dim, rope, quant)
    add_tokenizer(writer, tokenizer, int(config.vocab_size))
    for name, array in {**model_tensors(model, plans, head_dim), **extra}.items():
        data, raw = _encode(array, quant)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(source: Path, target: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (llama-cpp-python): `source` (an f16/f32 GGUF) → `target` at `quant`."""
    try:
        import llama_cpp
    except ImportError as error:
        raise DarwinLMError(f"--quant {quant} needs llama.cpp's quantizer, which is not installed",
                            "pip install -r requirements/llama.txt (llama-cpp-python)") from error
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FILE_TYPES[quant]
    params.nthread = threads
    # llama-cpp-python forwards llama.cpp's log through this logger's level: a line per tensor is noise here
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if status != 0:
        raise DarwinLMError(f"llama.cpp could not quantize {source.name} to {quant} (status {status})")


def export_gguf(model, tokenizer, out_uri: str, *, quant: str = "f16", metadata: dict | None = None) -> str:
    """Write the live `model` (shrunk, as LiveAssembly.apply leaves it, or a loaded export) + tokenizer as one
    GGUF file at `out_uri` (a path or fsspec URI). Nothing is left at `out_uri` unless the whole file is written."""
    check_gguf_exportable(model, quant)
    if uri_io.exists(out_uri):
        raise DarwinLMError(f"{out_uri} already exists", "choose a new output file or delete it")
    fs, target = fsspec.core.url_to_fs(out_uri)
    local = "file" in fs.protocol
    scratch_dir = Path(target).parent if local else None
    if local:
        scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".darwinlm-gguf-", dir=scratch_dir) as scratch:
        written = Path(scratch) / "model.gguf"
        base = Path(scratch) / "base.gguf" if quant == "q4_k_m" else written
        _write_file(model, tokenizer, base, "f16" if quant == "q4_k_m" else quant, metadata)
        if quant == "q4_k_m":
            quantize_with_llama_cpp(base, written, quant)
        if local:
            os.replace(written, target)  # same folder, so the rename is atomic
        else:
            fs.put_file(str(written), target)
    return out_uri
