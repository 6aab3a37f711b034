"""Storage under faults: transient errors and stalls are retried away, a permanent failure is one clear error,
a failed write leaves nothing behind, and a database is never visible without its manifest."""

import errno

import fsspec
import pytest

from tests.support.storage_faults import StorageFaults
from darwinlm.core import uri_io
from darwinlm.core.database.store import Database, DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from tests.support.tiny_models import random_token_rows, tiny_model

CALIBRATION = random_token_rows(128, rows=8, seq_len=16)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(uri_io, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def _manifest_implies_every_shard(root: str) -> None:
    if not uri_io.exists(uri_io.join(root, "manifest.json")):
        return
    database = Database.open(root)
    for module in database.manifest["modules"]:
        for level in range(1, len(module["levels"])):
            database.load(module["layer"], module["kind"], level)  # present and hash-checked


def test_transient_s3_faults_are_retried_to_the_same_database(tmp_path, s3_endpoint):
    model = tiny_model("llama", seed=5)
    config = DatabaseConfig(level_steps=3)
    local = build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c", config=config)
    s3 = fsspec.core.url_to_fs("s3://darwinlm/x")[0]
    with StorageFaults(s3, rate=0.4, slow_rate=0.2, seed=1) as faults:
        remote = build_database(model, CALIBRATION, "s3://darwinlm/faulty", calibration_digest="c", config=config)
        _manifest_implies_every_shard(remote.root)
    assert faults.injected >= 10 and faults.slowed >= 1
    assert remote.manifest == local.manifest


def test_a_permanent_s3_failure_is_one_clear_error_and_no_manifest(s3_endpoint):
    model = tiny_model("llama", seed=6)
    s3 = fsspec.core.url_to_fs("s3://darwinlm/x")[0]
    writes = []
    real_pipe = s3.pipe_file

    def pipe_then_break(path, data, **kwargs):  # the store goes away after a few writes
        writes.append(path)
        if len(writes) > 3:
            raise ConnectionError("bucket unreachable")
        return real_pipe(path, data, **kwargs)

    s3.pipe_file = pipe_then_break
    try:
        with pytest.raises(DarwinLMError) as error:
            build_database(model, CALIBRATION, "s3://darwinlm/broken", calibration_digest="c",
                           config=DatabaseConfig(level_steps=3))
    finally:
        del s3.pipe_file
    message = str(error.value)
    assert "\n" not in message and "storage kept failing while writing s3://darwinlm/broken/" in message
    assert not [p for p in s3.find("darwinlm/broken") if p.endswith("manifest.json")]


def test_local_disk_full_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    real_pipe = LocalFileSystem.pipe_file

    def half_write_then_full(self, path, data, **kwargs):
        real_pipe(self, path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    # on the class: patching the cached instance would leave a bound method behind on undo
    monkeypatch.setattr(LocalFileSystem, "pipe_file", half_write_then_full)
    with pytest.raises(DarwinLMError, match="no space left on the device while writing"):
        uri_io.write_bytes(str(tmp_path / "a" / "manifest.json"), b"x" * 100)
    assert list((tmp_path / "a").iterdir()) == []


def test_missing_files_are_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(uri_io, "RETRY_DELAYS", (60.0,))  # a retry would hang the test
    with pytest.raises(FileNotFoundError):
        uri_io.read_bytes(str(tmp_path / "nothing.json"))
