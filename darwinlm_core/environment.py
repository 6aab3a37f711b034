"""Offline and telemetry-off defaults, applied by entry points (CLI, flows, tests), never at import.

Users with a network opt back in by exporting e.g. HF_HUB_OFFLINE=0 before running darwinlm: we only fill
variables that are unset.
"""

import os

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
    """Set every unset offline/telemetry variable. Must run before huggingface_hub is imported to take effect."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
