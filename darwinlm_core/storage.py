"""Bytes in and out of any fsspec URI (a local path, s3://bucket/prefix, memory://...), never half-written.

Local files are written under a temporary name and renamed; object stores make a PUT visible only when it
completes, so the same call is atomic there too. Artifacts become visible as a whole by writing their
manifest last.
"""

import hashlib
import uuid

import fsspec


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` at `uri` so that readers see either nothing or all of it."""
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0]
    if "file" in fs.protocol:  # protocol is a str or a tuple of aliases
        fs.makedirs(parent, exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
