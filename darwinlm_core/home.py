"""Where darwinlm keeps its cached default model, default text and local artifacts."""

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def data_home() -> Path:
    """`$DARWINLM_HOME`, or ~/.cache/darwinlm."""
    return Path(os.environ.get("DARWINLM_HOME") or Path.home() / ".cache" / "darwinlm").expanduser()


def default_model_dir() -> Path:
    """The SmolLM2-135M safetensors folder that `setup` converts once from the GGUF shipped on PyPI."""
    return data_home() / "models" / DEFAULT_MODEL_NAME


def default_text_dir() -> Path:
    """Where `setup` unpacks the public-domain text (State of the Union, Moby-Dick) from npm."""
    return data_home() / "text"
