"""What write_results records, the results check accepts: the digest bench/results_file.py writes is the one
tests/test_results_files.py recomputes (written out there on its own), and it changes with any figure."""

import json

from bench import results_file
from tests.test_results_files import content_digest


def test_a_written_results_file_carries_the_digest_the_check_recomputes(tmp_path, monkeypatch):
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(results_file, "RESULTS_DIR", tmp_path / "results")
    origin = {"commit": "a" * 40, "dirty": False, "command": "python -m bench.speed", "config": {"reps": 3},
              "date": "2026-12-04", "machine": {}, "seeds": [0]}
    # tuples and number keys, as benches hand them over: the digest is of what the file holds
    rows = {"targets": {0.5: {"uniform": {"ppl_sotu": 20.25, "seeds": (1, 2)}}}, "ratio": float("nan")}
    path = results_file.write_results("speed", rows, echo=False, origin=origin)
    written = json.loads(path.read_text())
    assert written["provenance"] == {**origin, "content_sha256": content_digest(written)}
    assert "content_sha256" not in origin  # the caller's provenance is left as it was
    written["targets"]["0.5"]["uniform"]["ppl_sotu"] = 20.26
    assert content_digest(written) != written["provenance"]["content_sha256"]
    assert results_file.content_digest(written) == content_digest(written)
