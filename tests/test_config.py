"""Presets: every shipped preset validates and names its command; bad presets fail with one clear line."""

from pathlib import Path

import pytest

from darwinlm.core.config import PRESET_DIR, config_from_dict, load_preset, preset_names
from darwinlm.core.errors import DarwinLMError


def test_the_three_presets_ship():
    assert {"tiny", "smollm2-demo", "paper"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates_and_starts_with_its_command(name):
    config = load_preset(name)
    assert config.search.stages[-1].survivors == 1
    first_line = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# darwinlm compress --preset " + name)
    assert config_from_dict(config.to_dict()) == config  # survives the trip through Prefect parameters


def test_paper_preset_is_the_published_schedule():
    search = load_preset("paper").search
    assert search.offspring == 16 and search.generations == 200
    assert [s.survivors for s in search.stages] == [8, 4, 2, 1]
    assert [s.fitness_tokens for s in search.stages] == [1024, 2048, 4096, 8192]
    assert [s.finetune_tokens for s in search.stages] == [10_000, 50_000, 100_000, 200_000]


@pytest.mark.parametrize("content, message", [
    ("search:\n  generatoins: 3\n", "unknown option 'generatoins'"),
    ("data: {fitness_rows: 8}\n", "option 'fitness_rows' in preset bad.yaml.data was renamed — call it 'teacher_pool_rows'"),
    ("search: {start_calibration_tokens: 8}\n", "was renamed — call it 'start_slope_tokens'"),
    ("search:\n  fraction_removed: lots\n", "expected float"),
    ("search: [1, 2]\n", "must be a mapping"),
    ("search:\n  stages:\n    - {survivors: 2, fitness_tokens: 64}\n", "exactly 1"),
    ("data: {seq_len: 32, teacher_pool_rows: 1}\nsearch:\n  stages:\n    - {survivors: 1, fitness_tokens: 640}\n",
     "fitness tokens"),
    ("database: {gqa_mode: rows}\n", "unknown gqa_mode"),
    ("post_train: {refit_dense_weight: 1.5}\n", r"refit_dense_weight 1.5 is outside \[0, 1\]"),
    ("search: {a: [\n", "not valid YAML"),
])
def test_malformed_presets_fail_clearly(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(DarwinLMError, match=message) as error:
        load_preset(str(path))
    assert "\n" not in str(error.value)


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(DarwinLMError, match="tiny"):
        load_preset("nope")


def test_a_new_search_seed_reuses_the_database_rows_and_a_new_data_seed_does_not(tmp_path):
    import random

    from darwinlm.core.data.prepared import prepare_data
    from tests.support.tiny_models import tiny_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for index in range(60):
        (corpus / f"doc_{index:02d}.txt").write_text(" ".join(rng.choice(["the", "sea", "ship", "law"])
                                                              for _ in range(300)) + ".")
    tokenizer = tiny_tokenizer()

    def digest(search_seed: int, data_seed: int) -> str:
        config = load_preset("tiny", {"data": {"text": str(corpus), "seed": data_seed},
                                      "search": {"seed": search_seed}})
        return prepare_data(config.data, tokenizer).calibration_digest

    assert digest(0, 0) == digest(7, 0)  # the database's content address does not move with the search seed
    assert digest(0, 0) != digest(0, 1)


def test_gqa_cost_aware_off_keeps_run_names_and_on_changes_them():
    """Run roots are named by the config digest; an option added later, left off, must not rename runs
    started before it existed (their databases keep their addresses too)."""
    import dataclasses
    import hashlib
    import json

    config = load_preset("smollm2-demo", {"database": {"gqa_cost_aware": False}})
    values = dataclasses.asdict(config)
    values.pop("export")
    del values["database"]["gqa_cost_aware"]  # what the digest hashed before the option
    for later in ("latency_engine", "latency_threads"):  # search options added later still, left at their defaults
        del values["search"][later]
    assert config.digest == hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    aware = load_preset("smollm2-demo")  # on by default
    assert aware.database.gqa_cost_aware and aware.digest != config.digest


def test_the_shipped_refit_dense_weight_is_the_one_bench_database_chose():
    """Presets follow measurements: bench.database picks the refit's dense weight on validation text; the
    default must be that pick (rerun the bench after changing the refit, then set the default from it)."""
    import json

    from darwinlm.core.config import PostTrainConfig

    results = json.loads((Path(__file__).parents[1] / "bench" / "results" / "database.json").read_text())
    if "refit_dense_weight" not in results:
        pytest.skip("database.json predates the dense-weight curve")
    assert PostTrainConfig().refit_dense_weight == results["refit_dense_weight"]
