"""Latency-aware budgets: the measured table's shape, its storage next to the database, and a search that
holds a latency budget."""

import pytest

from darwinlm.core.search import latency
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.fitness import compute_teacher
from darwinlm.core.search.genome import Budget
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
from tests.support.tiny_models import random_token_rows, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def assembly(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=3, intermediate_size=256, hidden_size=128, num_attention_heads=8,
                       head_dim=16)
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=64)
    database = build_database(model, rows, str(tmp_path_factory.mktemp("db")), calibration_digest="c",
                              config=DatabaseConfig(level_steps=4, storage_dtype="float32"))
    return LiveAssembly(model, database), rows


def test_table_covers_every_module_and_level_and_never_rises(assembly):
    live, _ = assembly
    before = dict(live.levels)
    table = latency.measure_latency_table(live, batch=1, seq_len=64, repeats=3)
    assert live.levels == before  # measuring leaves the model as it found it
    assert len(table["modules"]) == 6 and table["rest_s"] >= 0 and table["dense_forward_s"] > 0
    for module in table["modules"]:
        seconds = module["seconds"]
        assert len(seconds) == live.database.num_levels(module["layer"], module["kind"])
        assert seconds[0] > 0 and seconds[-1] == 0.0
        assert all(a >= b for a, b in zip(seconds, seconds[1:]))
    dense = {(m["layer"], m["kind"]): 0 for m in table["modules"]}
    half = {(m["layer"], m["kind"]): len(m["seconds"]) // 2 for m in table["modules"]}
    assert latency.predicted_speedup(table, dense) == pytest.approx(1.0)
    assert latency.predicted_speedup(table, half) > 1.0


def test_table_is_stored_with_the_database_and_reused(assembly, monkeypatch):
    live, _ = assembly
    first = latency.load_or_measure(live, batch=1, seq_len=32)
    monkeypatch.setattr(latency, "measure_latency_table", lambda *a, **k: pytest.fail("measured twice"))
    assert latency.load_or_measure(live, batch=1, seq_len=32) == first


def test_search_holds_a_latency_budget(assembly):
    live, rows = assembly
    with pytest.raises(DarwinLMError, match="latency table"):
        Budget.from_database(live.database, fraction_removed=0.5, kind="latency")
    config = SearchConfig(fraction_removed=0.5, budget_kind="latency", generations=2, offspring=3, batch_size=1,
                          stages=(StageConfig(1, 64),))
    search = Search(live, compute_teacher(live.model, rows, top_k=16), rows, config)
    state = search.run()
    assert search.budget.kind == "latency" and search.budget.feasible(tuple(state.parent))
    table = latency.load_or_measure(live, batch=1, seq_len=64)
    levels = search.genome(state).assignment()
    seconds = {(m["layer"], m["kind"]): m["seconds"] for m in table["modules"]}
    kept = sum(seconds[key][level] for key, level in levels.items())
    assert kept <= 0.5 * sum(s[0] for s in seconds.values())  # the modules' time is halved, as asked
    assert latency.predicted_speedup(table, levels) > 1.0
