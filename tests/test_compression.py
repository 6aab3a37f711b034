"""The composition root: the genome a compression ships, what its export records, and local copies of URIs."""

import dataclasses
import os

import pytest

from darwinlm.core import uri_io
from darwinlm.core.compression import export_metadata, start_needs_a_model, winner_levels
from darwinlm.core.config import load_preset
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.evolution import SearchState
from darwinlm.core.search.genome import Budget
from tests.support.tiny_models import random_token_rows, tiny_model


@pytest.fixture
def database(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    return build_database(model, rows, str(tmp_path / "db"), calibration_digest="tiny",
                          config=DatabaseConfig(storage_dtype="float32"))


def config_with(**search):
    config = load_preset("tiny")
    return dataclasses.replace(config, search=dataclasses.replace(config.search, **search))


def no_live_search():
    raise AssertionError("the uniform start must not load a model")


def test_zero_generations_with_a_uniform_start_ship_uniform_from_the_database_alone(database):
    config = config_with(generations=0, start="uniform")
    assert not start_needs_a_model(config)
    expected = Budget.from_database(database, fraction_removed=config.search.fraction_removed,
                                    seq_len=config.data.seq_len).uniform()
    assert winner_levels(config, database, None, no_live_search) == expected
    assert start_needs_a_model(config_with(generations=0, start="best"))


def test_a_finished_search_ships_its_parent_and_an_unfinished_or_foreign_one_is_refused(database):
    config = config_with(generations=2)
    state = SearchState(config.search.digest, database.digest, 2, [1, 0, 0, 1], 0.5, [3, [0], None], [])
    assert winner_levels(config, database, state, no_live_search) == (1, 0, 0, 1)
    with pytest.raises(DarwinLMError, match="has not finished its 2 generations"):
        winner_levels(config, database, dataclasses.replace(state, generation=1), no_live_search)
    with pytest.raises(DarwinLMError, match="another search config"):
        winner_levels(config, database, dataclasses.replace(state, config_digest="other"), no_live_search)


def test_zero_generations_ship_the_start_the_choose_start_task_saved(database):
    config = config_with(generations=0, start="best")
    state = SearchState(config.search.digest, database.digest, 0, [1, 0, 1, 0], None, [3, [0], None], [],
                        start={"chosen": "informed"})
    assert winner_levels(config, database, state, no_live_search) == (1, 0, 1, 0)
    with pytest.raises(DarwinLMError, match="another search config"):
        winner_levels(config, database, dataclasses.replace(state, config_digest="other"), no_live_search)


def test_the_export_records_levels_per_kind_and_layer(database):
    assignment = {(0, "attn"): 1, (0, "mlp"): 2, (1, "attn"): 0, (1, "mlp"): 3}
    metadata = export_metadata(database, assignment, 1234, refit=True)
    assert metadata["levels"] == {"attn": [1, 0], "mlp": [2, 3]}
    assert (metadata["database"], metadata["kept_block_params"], metadata["refit"]) == (database.digest, 1234, True)
    assert metadata["dense_block_params"] == database.manifest["dense_params"]


def test_a_remote_file_or_folder_is_copied_whole_and_a_local_one_is_itself(tmp_path):
    uri_io.write_bytes("memory://darwinlm-test/model/config.json", b"{}")
    uri_io.write_bytes("memory://darwinlm-test/model/weights/a.bin", b"abc")
    folder = uri_io.local_path("memory://darwinlm-test/model", into=str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "config.json").read_bytes() == b"{}"
    assert (tmp_path / "copy" / "weights" / "a.bin").read_bytes() == b"abc" and folder == str(tmp_path / "copy")
    with pytest.raises(ValueError, match="pass the folder `into`, or read it with local_view"):
        uri_io.local_path("memory://darwinlm-test/model/weights/a.bin")  # a copy nobody would remove
    with uri_io.local_view("memory://darwinlm-test/model/weights/a.bin") as file:
        assert file.endswith("/a.bin") and open(file, "rb").read() == b"abc"
    assert not os.path.exists(os.path.dirname(file))  # the copy is gone with its block
    with uri_io.local_view(str(tmp_path)) as local:
        assert local == str(tmp_path)
    assert tmp_path.exists() and uri_io.local_path(str(tmp_path)) == str(tmp_path) and uri_io.is_local(str(tmp_path))
