"""Shared test setup: offline defaults for every test, a one-thread torch fixture for tiny-tensor tests, and a
moto S3 server for storage tests."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fsspec
import pytest
import torch

from darwinlm_core.environment import apply_offline_defaults

apply_offline_defaults()  # tests never reach a hub, whatever the shell exported


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one thread avoids OpenMP hand-off overhead on a shared, busy CPU (ms per op, not ~25)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server with bucket 'darwinlm', and fsspec configured to reach it; all undone afterwards."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        pytest.skip("moto_server is not installed")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_ACCESS_KEY_ID", "testing")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            patch.setitem(fsspec.config.conf, "s3",
                          {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}})
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir("darwinlm")
            yield endpoint
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        process.terminate()
        process.wait(timeout=10)
