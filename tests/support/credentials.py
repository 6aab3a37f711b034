"""Sentinel credentials and the scan for them: a run given these as S3 keys must not leave them anywhere."""

SENTINELS = {"key": "AKIASENTINEL7c41d2", "secret": "sentinel-secret-5f0e9a3b7d"}


def credential_leaks(sentinels, store_prefix: str, outputs: list[str]) -> list[str]:
    """Where any sentinel appears: MLflow params/tags/versions, Prefect parameters/logs, stored text, output."""
    import fsspec
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from darwinlm.tasks.tracking import tracking_uri

    texts = {"output": outputs}
    with get_client(sync_client=True) as client:
        texts["prefect"] = [str(run.parameters) for run in client.read_flow_runs()]
        texts["prefect"] += [log.message for log in client.read_logs()]
    mlflow = MlflowClient(tracking_uri=tracking_uri())
    texts["mlflow"] = []
    for run in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()]):
        texts["mlflow"] += [str(run.data.params), str(run.data.tags)]
    for version in mlflow.search_model_versions():
        texts["mlflow"] += [str(version.tags), str(version.source)]
    fs, root = fsspec.core.url_to_fs(store_prefix)
    texts["store"] = [fs.cat_file(p).decode(errors="replace") for p in fs.find(root)
                      if p.endswith((".json", ".py", ".txt", ".yaml"))]
    if not all(texts.values()):
        raise RuntimeError(f"nothing to scan in {[k for k, v in texts.items() if not v]}")
    return [f"{where}: {name}" for where, found in texts.items() for name, value in sentinels.items()
            if any(value in text for text in found)]
