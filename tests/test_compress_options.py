"""`darwinlm compress`'s options: each typed CompressParameters field is one option (declared once, on the model
the Prefect form shows), and --set reaches any other preset option by its dotted name."""

import pytest

from darwinlm.core.config import dotted_overrides, parse_setting
from darwinlm.core.errors import DarwinLMError
from darwinlm.flows import cli
from darwinlm.flows.parameters import CompressParameters


def compress_parameters(monkeypatch, *argv) -> CompressParameters:
    """The parameters `darwinlm compress ARGV` would start the flow with (the flow itself is not run)."""
    seen = {}
    monkeypatch.setattr("darwinlm.flows.compress.compress", lambda parameters: seen.setdefault("p", parameters) and {})
    monkeypatch.setattr("darwinlm.core.compression.preflight", lambda config: None)
    monkeypatch.setattr("darwinlm.flows.report.print_summary", lambda summary: None)
    assert cli.main(["compress", *argv]) == 0
    return seen["p"]


def test_every_typed_field_is_an_option_and_set_reaches_the_rest(monkeypatch, capsys):
    parameters = compress_parameters(monkeypatch, "--preset", "tiny", "--generations", "3", "--start", "uniform",
                                     "--set", "search.accept_z=0.5", "--set", "post_train.refit=false")
    config = parameters.config()
    assert (config.search.generations, config.search.start, config.search.accept_z) == (3, "uniform", 0.5)
    assert config.post_train.refit is False
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    shown = capsys.readouterr().out
    assert all(f"--{name.replace('_', '-')} " in shown for name in set(CompressParameters.model_fields) - cli.OWN_OPTIONS)


def test_a_field_given_twice_or_an_unknown_setting_is_refused_in_one_line(monkeypatch):
    with pytest.raises(DarwinLMError, match="search.generations is given twice"):
        CompressParameters(preset="tiny", generations=3, settings={"search.generations": 4}).config()
    with pytest.raises(DarwinLMError, match="unknown option 'acept_z'"):
        CompressParameters(preset="tiny", settings={"search.acept_z": 1}).config()


def test_dotted_settings_nest_and_read_their_values_as_yaml():
    assert dotted_overrides({"search.generations": "20", "post_train.refit": "false", "model": "smollm2",
                             "search.finetune.lr": "1e-5"}) == {  # YAML leaves 1e-5 text; the config types it
        "search": {"generations": 20, "finetune": {"lr": "1e-5"}}, "post_train": {"refit": False}, "model": "smollm2"}
    assert parse_setting("search.generations = 20") == ("search.generations", "20")
    with pytest.raises(DarwinLMError, match="is not NAME=VALUE"):
        parse_setting("search.generations")
    with pytest.raises(DarwinLMError, match="not a dotted option name"):
        dotted_overrides({"search.": 1})
