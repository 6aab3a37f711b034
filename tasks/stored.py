"""The two patterns every stage task shares: reuse an artifact an earlier run wrote, and keep live objects.

A task whose artifact already exists returns it without work: that is how a re-run of a finished compression
does nothing and a re-run of a crashed one continues where it stopped. (Prefect's own result cache is not used
for this: artifacts on storage survive a lost Prefect database and are shared by every run that can reach the
store.) Artifacts are written whole or not at all (uri_io.write_bytes writes a temporary name, then renames).
"""

import json
from typing import Callable, TypeVar

from pydantic import BaseModel

from darwinlm.core import uri_io

RecordT = TypeVar("RecordT", bound=BaseModel)


def read_json(uri: str):
    return json.loads(uri_io.read_bytes(uri))


def write_json(uri: str, value) -> None:
    uri_io.write_bytes(uri, json.dumps(value, indent=1).encode())


def stored_or_computed(uri: str, compute: Callable[[], RecordT], record_type: type[RecordT]) -> RecordT:
    """The record at `uri` if an earlier run wrote it; else `compute()` it, write it to `uri` and return it."""
    if uri_io.exists(uri):
        return record_type.model_validate(read_json(uri))
    record = compute()
    write_json(uri, record.model_dump())
    return record


def built_unless_marked(marker_uri: str, build: Callable[[], None]) -> bool:
    """Run `build` unless `marker_uri` (the last file `build` writes) exists; True when it ran."""
    if uri_io.exists(marker_uri):
        return False
    build()
    return True


class LiveObjects:
    """Live objects that consecutive tasks of one process share (the dense model with the driver's activations,
    the search's assembled model and teacher), because rebuilding them costs seconds to minutes. Keyed by the
    artifact root they work on. A crashed process loses them, and the next task rebuilds them from storage."""

    def __init__(self):
        self._objects: dict[str, object] = {}

    def get(self, key: str, create: Callable[[], object]):
        """The object kept under `key`, created (and kept) on first use."""
        if key not in self._objects:
            self._objects[key] = create()
        return self._objects[key]

    def release(self, key: str) -> None:
        """Drop the object kept under `key` (its stage is finished), if any."""
        self._objects.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._objects
