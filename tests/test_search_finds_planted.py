"""A search that starts from the uniform genome finds a planted module: one attention or MLP whose output
projection is made nearly silent, so removing it costs almost nothing. Uniform pruning takes from it only its
share; the search must move the budget there and remove it entirely. Without the plant, the same search keeps
those modules, so it is the plant, not chance or a habit of the search, that it found."""

import pytest
import torch

from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
from darwinlm.core.search.fitness import compute_teacher
from tests.support.tiny_models import random_token_rows, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Modules are numbered layer by layer, attention then MLP. These three are pruned below their last level by the
# uniform genome at 50% on this tiny model (layer 3's attention is not: uniform already removes it entirely).
PLANTABLE = {0: "layer 0 attention", 3: "layer 1 MLP", 4: "layer 2 attention"}


def searched(planted: int | None, folder) -> tuple[tuple, tuple, list[int], Search, object]:
    """(uniform genome, searched genome, each module's top level, the search, its final state) on a fresh tiny
    Llama whose module `planted` (None: none) has its output projection scaled to 2%."""
    model = tiny_model("llama", num_hidden_layers=4)
    if planted is not None:
        block = model.model.layers[planted // 2]
        with torch.no_grad():
            (block.mlp.down_proj if planted % 2 else block.self_attn.o_proj).weight.mul_(0.02)
    calibration = random_token_rows(model.config.vocab_size, rows=16, seq_len=32, seed=0)
    database = build_database(model, calibration, str(folder), calibration_digest="planted",
                              config=DatabaseConfig(storage_dtype="float32"))
    pool = compute_teacher(model, random_token_rows(model.config.vocab_size, rows=12, seq_len=32, seed=1), top_k=64)
    config = SearchConfig(fraction_removed=0.5, generations=20, offspring=4, seed=0, start="uniform",
                          stages=(StageConfig(2, 64), StageConfig(1, 128)), fixed_rows=2)
    search = Search(LiveAssembly(model, database), pool, pool.input_ids, config)
    state = search.run()
    top = [database.num_levels(layer, kind) - 1 for layer in range(4) for kind in ("attn", "mlp")]
    return search.budget.uniform(), tuple(state.parent), top, search, state


@pytest.mark.parametrize("planted", sorted(PLANTABLE), ids=PLANTABLE.get)
def test_a_search_from_uniform_removes_the_planted_module(planted, tmp_path):
    uniform, final, top, search, state = searched(planted, tmp_path)
    assert state.start == {"chosen": "uniform", "fixed_kl": search.fixed_kl(uniform)}
    assert uniform[planted] < top[planted], "uniform must leave something of the plant for the search to find"
    assert final[planted] == top[planted], (uniform, final)
    assert search.budget.feasible(final)
    assert state.parent_fixed_kl < search.fixed_kl(uniform)  # and the move paid off on rows never selected on


def test_without_a_plant_the_search_keeps_those_modules(tmp_path):
    uniform, final, top, _, _ = searched(None, tmp_path)
    assert all(final[module] < top[module] for module in PLANTABLE), (uniform, final)
