"""Bytes in and out of any fsspec URI (a local path, s3://bucket/prefix, memory://...), never half-written.

Local files are written under a temporary name and renamed; object stores make a PUT visible only when it
completes, so the same call is atomic there too. Artifacts become visible as a whole by writing their
manifest last.

Stores fail transiently (a dropped connection, a throttled bucket): every call is retried with backoff on
OSError, except errors that retrying cannot fix (missing file, no permission, disk full), and a call that
keeps failing ends in one DarwinLMError naming the URI.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import time
import uuid

import fsspec

from darwinlm.core.errors import DarwinLMError

# Seconds between attempts: four attempts over ~5 s ride out a blip without hiding an outage for long.
RETRY_DELAYS = (0.25, 1.0, 4.0)
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def _retrying(action: str, uri: str, operation):
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return operation()
        except _NOT_TRANSIENT:
            raise
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise DarwinLMError(f"no space left on the device while {action} {uri}",
                                    "free space there, or write elsewhere (--store, --out)") from error
            if delay is None:
                raise DarwinLMError(f"storage kept failing while {action} {uri} ({attempt} attempts): {error}",
                                    "check that the store is reachable and its credentials, then re-run "
                                    "(finished stages are kept)") from error
            time.sleep(delay)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return _retrying("checking", uri, lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return _retrying("reading", uri, lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` at `uri` so that readers see either nothing or all of it."""
    fs, path = _fs(uri)
    if "file" not in fs.protocol:  # protocol is a str or a tuple of aliases
        _retrying("writing", uri, lambda: fs.pipe_file(path, data))
        return
    parent = path.rsplit("/", 1)[0]
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"

    def write_then_rename():
        fs.makedirs(parent, exist_ok=True)
        try:
            fs.pipe_file(temporary, data)
            fs.mv(temporary, path)
        finally:
            if fs.exists(temporary):  # a failed write leaves nothing behind, not even its temporary
                fs.rm(temporary)

    _retrying("writing", uri, write_then_rename)


def remove(uri: str) -> None:
    """Delete the file at `uri`; nothing there is fine."""
    fs, path = _fs(uri)
    _retrying("removing", uri, lambda: fs.rm(path) if fs.exists(path) else None)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_local(uri: str) -> bool:
    """Whether `uri` is on this machine's file system (a plain path or file://)."""
    return "file" in _fs(uri)[0].protocol  # protocol is a str or a tuple of aliases


def local_path(uri: str, into: str | None = None) -> str:
    """A local path holding what `uri` names (a file or a folder): the path itself when it is local, else a copy
    downloaded whole into the folder `into` (created), which the caller owns and must name. A folder's copy is
    `into` itself, a file's is `into/<its name>` (so a GGUF or a model card keeps its file name). For a copy
    needed only while some code reads it, use `local_view`, which removes it."""
    fs, path = _fs(uri)
    if is_local(uri):
        return path
    if into is None:  # a folder nobody owns would never be removed
        raise ValueError(f"local_path({uri!r}) downloads: pass the folder `into`, or read it with local_view")
    os.makedirs(into, exist_ok=True)
    if _retrying("checking", uri, lambda: fs.isdir(path)):
        _retrying("downloading", uri, lambda: fs.get(path.rstrip("/") + "/", into, recursive=True))
        return into
    local = os.path.join(into, path.rsplit("/", 1)[-1])
    _retrying("downloading", uri, lambda: fs.get_file(path, local))
    return local


@contextlib.contextmanager
def local_view(uri: str):
    """A local path holding what `uri` names, for the length of a `with` block: the path itself when it is local,
    else a copy in a temporary folder that is removed when the block ends. A store on S3 is read this way at
    every evaluation, export and registration: kept copies would fill the temporary folder run after run."""
    if is_local(uri):
        yield _fs(uri)[1]
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="darwinlm-download-") as folder:
        yield local_path(uri, into=folder)


@contextlib.contextmanager
def lock(uri: str, on_wait=None):
    """Hold an exclusive lock named `uri` while the block runs, so concurrent processes share one piece of work
    instead of doing it twice. Local stores use flock, which the OS drops when a process dies (a killed run
    never leaves a stale lock); `on_wait()` is called if another process holds it. Object stores have no locks: there the block runs unlocked, and concurrent runs
    may repeat work but cannot corrupt it (writes are atomic and content-addressed, results deterministic)."""
    fs, path = _fs(uri)
    if "file" not in fs.protocol:
        yield
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
