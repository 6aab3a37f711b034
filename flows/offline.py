"""Offline and telemetry-off defaults, applied by entry points (CLI, flows, tests), never at import.

Users with a network opt back in by exporting e.g. HF_HUB_OFFLINE=0 before running darwinlm: we only fill
variables that are unset.
"""

import os
import sys

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def apply_offline_defaults() -> None:
    """Set every unset offline/telemetry variable, also where huggingface_hub has already read them."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; every check after that reads this constant.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes", "on")
