"""The nightly flow's checkpoint discovery, and the deployment file's shape."""

from pathlib import Path

import yaml

from darwinlm.flows.nightly import find_checkpoints, local_copy

REPO = Path(__file__).resolve().parent.parent


def test_find_checkpoints_lists_only_model_folders(tmp_path):
    for name in ("ckpt-b", "ckpt-a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    found = find_checkpoints(str(tmp_path))
    assert [Path(p).name for p in found] == ["ckpt-a", "ckpt-b"]
    assert local_copy(found[0]) == found[0]


def test_memory_filesystem_checkpoints_are_downloaded_once(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path))
    fs = fsspec.filesystem("memory")
    fs.pipe("/nightly/ckpt-1/config.json", b"{}")
    fs.pipe("/nightly/ckpt-1/model.safetensors", b"weights")
    [uri] = find_checkpoints("memory://nightly")
    folder = Path(local_copy(uri))
    assert (folder / "config.json").read_text() == "{}" and (folder / "model.safetensors").read_bytes() == b"weights"
    fs.rm("/nightly", recursive=True)
    assert local_copy(uri) == str(folder)  # cached: no second download (the source is gone)


def test_deployments_declare_compress_and_a_scheduled_nightly():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert deployments["compress"]["entrypoint"] == "flows/compress.py:compress"
    assert deployments["nightly"]["entrypoint"] == "flows/nightly.py:nightly"
    assert deployments["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    for deployment in deployments.values():
        module, name = deployment["entrypoint"].split(":")
        source = (REPO / module).read_text()
        assert f"def {name}(" in source
