"""Every case of the bad-input catalogue (tests/support/bad_inputs.py): one clear error line, non-zero exit, and
nothing written at the output location."""

import pytest

from tests.support.bad_inputs import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, monkeypatch):
    result = run_case(case, tmp_path, monkeypatch)
    assert result["clean_error"], result
    assert result["wrote"] == [], result
