"""The tasks' shared patterns: an artifact an earlier run wrote is reused, live objects are kept per key,
and references are typed (a misspelt field fails at once)."""

import pytest
from pydantic import ValidationError

from darwinlm.tasks.refs import DatabaseRef, GenomeRef
from darwinlm.tasks.stored import LiveObjects, built_unless_marked, read_json, stored_or_computed


def test_a_stored_record_is_reused_and_a_missing_one_computed_once(tmp_path):
    uri, calls = str(tmp_path / "run" / "database.json"), []

    def compute() -> DatabaseRef:
        calls.append(1)
        return DatabaseRef(uri="s3://bucket/db", digest="abc")

    first = stored_or_computed(uri, compute, DatabaseRef)
    assert first == DatabaseRef(uri="s3://bucket/db", digest="abc") and read_json(uri) == first.model_dump()
    assert stored_or_computed(uri, compute, DatabaseRef) == first and calls == [1]


def test_a_failed_computation_writes_nothing(tmp_path):
    uri = tmp_path / "genome.json"
    with pytest.raises(RuntimeError):
        stored_or_computed(str(uri), lambda: (_ for _ in ()).throw(RuntimeError("search crashed")), GenomeRef)
    assert not uri.exists() and list(tmp_path.iterdir()) == []


def test_built_unless_marked_runs_only_without_the_marker(tmp_path):
    marker = tmp_path / "model" / "config.json"
    assert built_unless_marked(str(marker), lambda: (marker.parent.mkdir(), marker.write_text("{}"))) is True
    assert built_unless_marked(str(marker), lambda: pytest.fail("built twice")) is False


def test_live_objects_are_created_once_per_key_and_released():
    live, made = LiveObjects(), []
    assert live.get("run-a", lambda: made.append("a") or "model a") == "model a"
    assert live.get("run-a", lambda: made.append("again") or "other") == "model a"
    assert "run-a" in live and made == ["a"]
    live.release("run-a")
    live.release("never-there")
    assert "run-a" not in live


def test_refs_refuse_unknown_fields_and_are_frozen():
    with pytest.raises(ValidationError, match="digset"):
        DatabaseRef(uri="/db", digset="abc")
    ref = DatabaseRef(uri="/db", digest="abc")
    with pytest.raises(ValidationError):
        ref.uri = "/elsewhere"
