"""The `nightly` flow: compress every checkpoint under a location that has not been compressed yet.

A checkpoint is a folder holding config.json, directly under `location` (a local folder or an fsspec URI such
as s3://bucket/checkpoints/). Remote checkpoints are downloaded once into the data home. Because a
compression's run root is named by its config (which names the model), a checkpoint compressed on an
earlier night costs a few seconds of artifact checks and no compute: each is compressed exactly once.
"""

import hashlib

import fsspec
from prefect import flow, get_run_logger

from darwinlm_core.environment import apply_offline_defaults
from darwinlm_core.home import data_home
from flows.compress import CompressParameters, compress


def find_checkpoints(location: str) -> list[str]:
    """URIs of the folders directly under `location` that hold a config.json, sorted."""
    fs, root = fsspec.core.url_to_fs(location)
    found = []
    for entry in fs.ls(root, detail=True):
        if entry["type"] == "directory" and fs.exists(f"{entry['name'].rstrip('/')}/config.json"):
            found.append(entry["name"] if "file" in fs.protocol else fs.unstrip_protocol(entry["name"]))
    return sorted(found)


def local_copy(uri: str) -> str:
    """A local folder for a checkpoint URI: itself when local, else a one-time download under the data home."""
    fs, path = fsspec.core.url_to_fs(uri)
    if "file" in fs.protocol:
        return path
    target = data_home() / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").exists():
        partial = target.with_suffix(".partial")
        fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
        partial.rename(target)
    return str(target)


@flow(name="nightly", log_prints=True)
def nightly(location: str, preset: str = "smollm2-demo", store: str | None = None) -> list[dict]:
    """Compress each checkpoint under `location` with `preset`; returns one summary per checkpoint."""
    apply_offline_defaults()
    logger = get_run_logger()
    summaries = []
    for checkpoint in find_checkpoints(location):
        logger.info("checkpoint %s", checkpoint)
        summaries.append(compress(CompressParameters(preset=preset, model=local_copy(checkpoint), store=store)))
    return summaries
