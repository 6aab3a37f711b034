"""Fault injection for fsspec filesystems: transient errors and slow responses on reads, writes and checks.

    with StorageFaults(fsspec.filesystem("s3"), rate=0.3, seed=0) as faults:
        ...  # every cat_file / pipe_file / exists on that filesystem instance may now fail or stall
    faults.injected, faults.calls

Transient faults fail a call with ConnectionError or TimeoutError (both OSError, as s3fs raises them) at most
`max_in_a_row` times in a row for the same call, so a client that retries enough always gets through;
`permanent=True` fails every call. fsspec caches filesystem instances per storage options, so patching the
instance darwinlm's storage layer resolves to patches what it uses.
"""

import contextlib
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_METHODS = ("cat_file", "pipe_file", "exists")


class StorageFaults:
    def __init__(self, fs, *, rate: float = 0.3, slow_rate: float = 0.1, slow_s: float = 0.05,
                 max_in_a_row: int = 2, permanent: bool = False, seed: int = 0, methods=_METHODS):
        self.fs, self.rate, self.slow_rate, self.slow_s = fs, rate, slow_rate, slow_s
        self.max_in_a_row, self.permanent, self.methods = max_in_a_row, permanent, methods
        self.rng = random.Random(seed)
        self.calls = self.injected = self.slowed = 0
        self._in_a_row: dict[tuple, int] = {}
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, method):
        def faulty(path, *args, **kwargs):
            self.calls += 1
            key = (name, str(path))
            if self.rng.random() < self.slow_rate:
                self.slowed += 1
                time.sleep(self.slow_s)
            if self.permanent or (self._in_a_row.get(key, 0) < self.max_in_a_row and self.rng.random() < self.rate):
                self._in_a_row[key] = self._in_a_row.get(key, 0) + 1
                self.injected += 1
                error = self.rng.choice([ConnectionError, TimeoutError])
                raise error(f"injected fault in {name}({path})")
            self._in_a_row[key] = 0
            return method(path, *args, **kwargs)

        return faulty

    def __enter__(self) -> "StorageFaults":
        for name in self.methods:
            self._saved[name] = self.fs.__dict__.get(name)
            setattr(self.fs, name, self._wrap(name, getattr(self.fs, name)))
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(self.fs, name)
            else:
                setattr(self.fs, name, saved)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = "darwinlm"):
    """A moto S3 server on 127.0.0.1 with `bucket`, and fsspec (and boto) configured to reach it with test
    credentials; everything undone afterwards. Yields the endpoint URL."""
    import fsspec
    import pytest
    import s3fs

    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        raise FileNotFoundError("moto_server is not installed (requirements/dev.txt: moto[server])")
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
            s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
            yield endpoint
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        process.terminate()
        process.wait(timeout=10)
