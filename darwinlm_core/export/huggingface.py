"""Export a pruned live model as a Hugging Face folder, locally or on any fsspec URI.

compact (default): the family's pruned config class (per-layer heads and widths), only the kept weights, the
    tokenizer, and modeling_pruned.py referenced by `auto_map`, so it loads with trust_remote_code anywhere
    and without it after `darwinlm.core.register_pruned_classes()`.
padded: the plain family architecture with removed heads/channels as zeros, for tools that cannot run custom
    code: the same function, but the size and speed of the dense model.
The folder is assembled under a temporary name; `config.json` is published last, so a reader never sees a
loadable folder that is missing weights.
"""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import fsspec
import torch
from safetensors.torch import save_file

from darwinlm.core import uri_io
from darwinlm.core.database.structure import MODULE_KINDS
from darwinlm.core.model import pruned as modeling_pruned
from darwinlm.core.model.dtypes import DTYPES
from darwinlm.core.model.arch import arch_for
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.export.model_card import render_card
from darwinlm.core.model.pruned import PRUNED_CLASSES, ZeroAttention, ZeroMLP

EXPORT_FORMATS = ("compact", "padded")


def read_level_assignment(uri: str, database) -> dict[tuple[int, str], int]:
    """{(layer, kind): level} from a JSON file {"attn": [...], "mlp": [...]}, checked against `database`."""
    try:
        raw = json.loads(uri_io.read_bytes(uri))
    except FileNotFoundError as error:
        raise DarwinLMError(f"level file {uri} not found", "pass the JSON file the search wrote") from error
    except ValueError as error:
        raise DarwinLMError(f"level file {uri} is not JSON", 'expected {"attn": [...], "mlp": [...]}') from error
    if raw.get("database", database.digest) != database.digest:
        raise DarwinLMError(
            f"levels in {uri} were chosen for database {raw['database']}, not {database.digest}",
            "pass the database the search used",
        )
    layers = database.manifest["base_model"]["num_layers"]
    levels = {}
    for kind in MODULE_KINDS:
        per_layer = raw.get(kind)
        if not isinstance(per_layer, list) or len(per_layer) != layers:
            raise DarwinLMError(f"level file {uri} needs a list of {layers} levels under '{kind}'",
                                f"this database has {layers} layers")
        for layer, level in enumerate(per_layer):
            top = database.num_levels(layer, kind) - 1
            if not isinstance(level, int) or not 0 <= level <= top:
                raise DarwinLMError(f"level file {uri}: {kind} level {level!r} of layer {layer} is not in 0..{top}",
                                    "use levels listed in the database manifest")
            levels[(layer, kind)] = level
    return levels


def layer_widths(model) -> dict[str, list]:
    """Per-layer query heads, KV heads, MLP widths, uneven KV maps and output biases of a (possibly shrunk) live
    model.

    Read off the output projections (o_proj inputs = query heads × head_dim, down_proj inputs = MLP width) and
    the input linears' total rows ((query + 2 × KV heads) × head_dim), so fused q/k/v need no special case.
    """
    spec = arch_for(model)
    head_dim = spec.head_layout(model.config).head_dim
    widths = {field: [] for field in modeling_pruned.PER_LAYER_FIELDS}
    for block in spec.block_list(model):
        attention, mlp = spec.attention_of(block), spec.mlp_of(block)
        if isinstance(attention, ZeroAttention):
            query_heads, kv_heads, kv_of_query = 0, 0, None
        else:
            query_heads = attention.get_submodule(spec.o_proj).in_features // head_dim
            input_rows = sum(linear.out_features for linear, _ in spec.input_linears(attention, "attn"))
            kv_heads = (input_rows // head_dim - query_heads) // 2
            kv_of_query = getattr(attention, "kv_of_query", None)
        widths["layer_query_heads"].append(query_heads)
        widths["layer_kv_heads"].append(kv_heads)
        widths["layer_kv_of_query"].append(kv_of_query)
        widths["layer_intermediate_sizes"].append(
            0 if isinstance(mlp, ZeroMLP) else mlp.get_submodule(spec.down_proj).in_features
        )
        widths["layer_o_proj_bias"].append(_has_bias(attention, ZeroAttention, spec.o_proj))
        widths["layer_down_proj_bias"].append(_has_bias(mlp, ZeroMLP, spec.down_proj))
    if all(entry is None for entry in widths["layer_kv_of_query"]):
        widths["layer_kv_of_query"] = None
    for field in ("layer_o_proj_bias", "layer_down_proj_bias"):
        if not any(widths[field]):  # no output bias anywhere: the family's own layers
            widths[field] = None
    return widths


def _has_bias(module, removed_class, output: str) -> bool:
    """Whether a module's output projection has a bias (a removed module has none). FLAP-style compensation adds
    one where the family has none; the pruned config records it per layer (layer_o_proj_bias, ...)."""
    return not isinstance(module, removed_class) and module.get_submodule(output).bias is not None


def pruned_config(model):
    """The pruned config class of the model's family, carrying its current per-layer widths."""
    base_type = model.config.model_type
    if base_type not in PRUNED_CLASSES:
        raise DarwinLMError(f"no compact export class for '{base_type}' (compact export: {', '.join(PRUNED_CLASSES)})",
                            "export with --format padded (the plain architecture, pruned units zeroed)")
    config_class, model_class = PRUNED_CLASSES[base_type]
    values = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", *modeling_pruned.PER_LAYER_FIELDS):
        values.pop(key, None)
    config = config_class(**values, **layer_widths(model))
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"modeling_pruned.{config_class.__name__}",
                       "AutoModelForCausalLM": f"modeling_pruned.{model_class.__name__}"}
    return config


def _write_weights(model, folder: Path, dtype: torch.dtype, config) -> None:
    config.dtype = str(dtype).removeprefix("torch.")
    tensors = {name: tensor.detach().to(device="cpu", dtype=dtype).contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied to the input embedding; from_pretrained re-ties it
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)


def _write_compact(model, folder: Path, dtype: torch.dtype) -> None:
    shutil.copy(modeling_pruned.__file__, folder / "modeling_pruned.py")
    _write_weights(model, folder, dtype, pruned_config(model))


def _write_padded(model, folder: Path, dtype: torch.dtype) -> None:
    widths, dense = layer_widths(model), model.config
    if widths["layer_kv_of_query"] is not None or any(
        q != dense.num_attention_heads or w != dense.intermediate_size
        for q, w in zip(widths["layer_query_heads"], widths["layer_intermediate_sizes"])
    ):
        raise ValueError("padded export needs the model in masked form: LiveAssembly.apply(levels, masked=True)")
    _write_weights(model, folder, dtype, copy.deepcopy(model.config))


def export_model(model, tokenizer, out_uri: str, *, export_format: str = "compact", dtype: str = "float32",
                 metadata: dict | None = None) -> str:
    """Write the live `model` (shrunk for compact, masked for padded) + tokenizer as an HF folder at `out_uri`."""
    if export_format not in EXPORT_FORMATS:
        raise DarwinLMError(f"unknown export format '{export_format}'", f"use one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in DTYPES:
        raise DarwinLMError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    if uri_io.exists(uri_io.join(out_uri, "config.json")):
        raise DarwinLMError(f"{out_uri} already holds a model", "choose a new output location or delete it")
    with tempfile.TemporaryDirectory(prefix="darwinlm-export-") as scratch:
        folder = Path(scratch)
        writer = _write_compact if export_format == "compact" else _write_padded
        writer(model, folder, DTYPES[dtype])
        tokenizer.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        info = {"format": export_format, "total_params": sum(p.numel() for p in model.parameters()), **(metadata or {})}
        (folder / "darwinlm.json").write_text(json.dumps(info, indent=1))
        config = json.loads((folder / "config.json").read_text())
        (folder / "README.md").write_text(render_card(config, info, (metadata or {}).get("evaluation")))
        _publish(folder, out_uri)
    return out_uri


def _publish(folder: Path, out_uri: str) -> None:
    """Copy every file to `out_uri`, config.json last: a folder without config.json is not a model."""
    files = sorted(path for path in folder.iterdir() if path.name != "config.json") + [folder / "config.json"]
    fs, root = fsspec.core.url_to_fs(out_uri)
    created = not fs.exists(root)
    fs.makedirs(root, exist_ok=True)
    written = []
    try:
        for path in files:
            uri_io.write_bytes(uri_io.join(out_uri, path.name), path.read_bytes())
            written.append(path.name)
    except BaseException:  # a failed export (disk full, store down) leaves nothing, not a config-less folder
        for name in written:
            fs.rm(f"{root.rstrip('/')}/{name}")
        if created and fs.exists(root):
            fs.rm(root, recursive=True)
        raise
