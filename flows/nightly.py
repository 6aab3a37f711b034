"""The `nightly` flow: compress every checkpoint under a location that has not been compressed yet.

A location is a local folder or an fsspec URI (s3://bucket/checkpoints/) whose sub-folders holding a config.json
are checkpoints, or `models:/NAME`, an MLflow registered model whose every version is a checkpoint. Remote
checkpoints are downloaded once into the data home. A compression's run root is named by its config (which
names the checkpoint's local copy), and a finished one leaves registered.json there: a checkpoint compressed on
an earlier night is skipped without starting a compression, so each is compressed exactly once.
"""

import hashlib
import shutil
from pathlib import Path

import fsspec
from prefect import flow, get_run_logger

from darwinlm.core import uri_io
from darwinlm.flows.offline import apply_offline_defaults
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import data_home
from darwinlm.core.store_layout import RunLayout
from darwinlm.flows.compress import CompressParameters, compress, run_root

REGISTRY_PREFIX = "models:/"


def find_checkpoints(location: str) -> list[str]:
    """URIs of the checkpoints at `location`, sorted (registered versions by version number)."""
    if location.startswith(REGISTRY_PREFIX):
        return _registered_versions(location.removeprefix(REGISTRY_PREFIX).strip("/"))
    fs, root = fsspec.core.url_to_fs(location)
    if not fs.exists(root):
        raise DarwinLMError(f"checkpoint location {location} does not exist", "give a folder, an s3:// prefix, "
                            "or models:/NAME of an MLflow registered model")
    found = []
    for entry in fs.ls(root, detail=True):
        if entry["type"] == "directory" and fs.exists(f"{entry['name'].rstrip('/')}/config.json"):
            found.append(entry["name"] if "file" in fs.protocol else fs.unstrip_protocol(entry["name"]))
    return sorted(found)


def _registered_versions(name: str) -> list[str]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from darwinlm.tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        raise DarwinLMError(f"no registered model '{name}' in MLflow at {tracking_uri()}",
                            "check the name, or set MLFLOW_TRACKING_URI to the registry that holds it") from error
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return [f"{REGISTRY_PREFIX}{name}/{version}" for version in versions]


def local_copy(uri: str) -> str:
    """A local folder for a checkpoint URI: itself when local, else a one-time download under the data home."""
    if not uri.startswith(REGISTRY_PREFIX) and uri_io.is_local(uri):
        return uri_io.local_path(uri)
    target = data_home() / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").exists():
        partial = target.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)  # a download that died halfway
        if uri.startswith(REGISTRY_PREFIX):
            _download_registered(uri, partial)
        else:
            uri_io.local_path(uri, into=str(partial))
        partial.rename(target)
    return str(target)


def _download_registered(uri: str, folder: Path) -> None:
    """Download a registered version's files; its checkpoint is the shallowest folder holding config.json."""
    import mlflow.artifacts

    from darwinlm.tasks.tracking import tracking_uri

    download = folder.with_suffix(".download")
    shutil.rmtree(download, ignore_errors=True)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download), tracking_uri=tracking_uri())
    configs = sorted(Path(download).rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        shutil.rmtree(download)
        raise DarwinLMError(f"{uri} holds no config.json", "register a Hugging Face checkpoint folder")
    configs[0].parent.rename(folder)
    shutil.rmtree(download, ignore_errors=True)


@flow(name="nightly", log_prints=True)
def nightly(location: str, preset: str = "smollm2-demo", text: str | None = None,
            store: str | None = None) -> list[dict]:
    """Compress each checkpoint at `location` (folder, s3:// prefix, or models:/NAME) with `preset`, once;
    returns one summary per checkpoint compressed tonight."""
    apply_offline_defaults()
    logger = get_run_logger()
    summaries = []
    for checkpoint in find_checkpoints(location):
        parameters = CompressParameters.of(preset, model=local_copy(checkpoint), text=text, store=store)
        if uri_io.exists(RunLayout(run_root(parameters)).registered):
            logger.info("checkpoint %s: compressed before, skipped", checkpoint)
            continue
        logger.info("checkpoint %s: compressing", checkpoint)
        summaries.append(compress(parameters))
    return summaries
