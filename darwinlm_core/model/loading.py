"""Load a causal LM and its tokenizer from a local Hugging Face folder, the `smollm2` alias, or a hub id.

The config is read and checked against the architecture registry before any weights are loaded, so an
unsupported model fails in a second with a one-line error instead of after a multi-GB read.
"""

import os
import pickle  # for its exception type only: nothing here unpickles
from pathlib import Path

import torch

from darwinlm.core.model.registration import register_pruned_classes
from darwinlm.core.model.arch import arch_for
from darwinlm.core.model.dtypes import DTYPES
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import default_model_dir

DEFAULT_MODEL_ALIAS = "smollm2"



def resolve_model_location(name: str) -> str:
    """A local folder path or hub id for `name`; the alias `smollm2` means the cached default."""
    if name == DEFAULT_MODEL_ALIAS:
        folder = default_model_dir()
        if not (folder / "config.json").is_file():
            raise DarwinLMError(
                f"the default model is not prepared at {folder}",
                "run `make setup` (converts SmolLM2-135M once, offline) or pass --model /path/to/hf_folder",
            )
        return str(folder)
    path = Path(name).expanduser()
    looks_like_path = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise DarwinLMError(f"model folder {name} does not exist", "pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise DarwinLMError(
                f"{name} is not a Hugging Face model folder (no config.json)",
                "pass the folder that save_pretrained() wrote",
            )
        return str(path)
    return name  # a hub id: only reachable for users with a network


def load_config(name: str):
    """The model's config, after checking that darwinlm supports its architecture."""
    register_pruned_classes()  # so darwinlm's own pruned exports load too
    from transformers import AutoConfig

    location = resolve_model_location(name)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error
    arch_for(config)
    return config


def load_tokenizer(name: str):
    """The model's tokenizer, after checking the architecture is supported and the tokenizer fits the model
    (no weights are read: this is the seconds-long check a run makes before it starts)."""
    register_pruned_classes()  # so darwinlm's own pruned exports load too
    from transformers import AutoTokenizer

    config = load_config(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_location(name))
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error
    check_tokenizer_matches(tokenizer, config, name)
    return tokenizer


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is present, else cpu; an explicit device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise DarwinLMError(f"unknown device '{device}'", "use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DarwinLMError(f"device '{device}' asked for, but torch sees no GPU", "use device: auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` → bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slow and OBS wants float32)."""
    if dtype == "auto":
        return "bfloat16" if resolve_device(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise DarwinLMError(f"unknown dtype '{dtype}'", f"use auto or one of {', '.join(DTYPES)}")
    return dtype


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode, tokenizer) for a folder, the `smollm2` alias, or a hub id; dtype and device may be
    `auto` (see resolve_dtype, resolve_device)."""
    register_pruned_classes()  # so darwinlm's own pruned exports load too
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, device = resolve_dtype(dtype, device), resolve_device(device)
    config = load_config(name)
    location = resolve_model_location(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        check_tokenizer_matches(tokenizer, config, name)  # before reading weights: fail in seconds
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype]).to(device)
    except pickle.UnpicklingError as error:  # transformers loads .bin files with torch.load(weights_only=True)
        raise DarwinLMError(f"the weights of {name} hold pickled objects besides tensors; darwinlm loads only "
                            "safetensors or weights-only torch files, and will not run code from a checkpoint",
                            "convert the checkpoint to safetensors where you trust its source") from error
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from error
    return model.eval(), tokenizer


def check_tokenizer_matches(tokenizer, config, name: str) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range mid-run: refuse it now."""
    if len(tokenizer) > config.vocab_size:
        raise DarwinLMError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but the model embeds only {config.vocab_size}",
            "use the tokenizer saved with this model",
        )


def _load_error(name: str, error: Exception) -> DarwinLMError:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return DarwinLMError(
            f"cannot load model '{name}' offline ({type(error).__name__})",
            "pass a local Hugging Face folder or `smollm2`, or export HF_HUB_OFFLINE=0 to use the hub",
        )
    return DarwinLMError(f"cannot load model '{name}': {str(error).splitlines()[0]}")
