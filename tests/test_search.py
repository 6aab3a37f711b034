"""Genome budget, mutation, fitness, training-aware selection and resumable search on tiny models."""

import random
import statistics

import pytest
import torch

from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.finetune import FinetuneConfig, finetune
from darwinlm.core.search.fitness import compute_teacher, exact_kl_per_token, kl_per_token
from darwinlm.core.search.genome import Budget, budget_neutral_switch, mutate, offspring
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig, paired_z
from tests.support.tiny_models import PLAIN_LADDERS, random_token_rows, tiny_model


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tiny_database(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=4)
    rows = random_token_rows(model.config.vocab_size, rows=16, seq_len=32)
    return build_database(model, rows, str(tmp_path_factory.mktemp("db")), calibration_digest="tiny",
                          config=DatabaseConfig(storage_dtype="float32", **PLAIN_LADDERS))


@pytest.fixture
def tiny_setup(tiny_database):
    """A fresh dense model (the database's: same arguments, same weights) and the module's database: a test that
    assembles, finetunes or prunes the model leaves nothing behind for the next."""
    return tiny_model("llama", num_hidden_layers=4), tiny_database


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_mutation_keeps_every_offspring_within_the_budget(tiny_setup, kind):
    _, database = tiny_setup
    budget = Budget.from_database(database, fraction_removed=0.5, kind=kind, seq_len=32)
    parent = budget.uniform()
    assert budget.feasible(parent)
    rng = random.Random(0)
    children = offspring(parent, 20, budget, rng)
    assert len(children) == len(set(children)) == 20 and parent not in children
    for child in children + [mutate(child, budget, rng) for child in children]:  # a grandchild may be the parent
        assert budget.feasible(child), (budget.cost(child), budget.target, budget.tolerance)


def test_budget_rejects_unreachable_targets(tiny_setup):
    _, database = tiny_setup
    with pytest.raises(DarwinLMError, match="outside"):
        Budget.from_database(database, fraction_removed=1.5)


def test_kl_of_a_model_to_itself_is_zero_and_compact_kl_matches_exact(tmp_path):
    # Trained LMs are confident: their top few hundred tokens hold nearly all the mass. A random tiny model is
    # nearly uniform, so scale its head to make it as peaked as a real one (top-64 of 128 ≈ all the mass).
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    rows = random_token_rows(model.config.vocab_size, rows=4, seq_len=16, seed=5)
    teacher = compute_teacher(model, rows, top_k=64)
    assert abs(kl_per_token(model, teacher)) < 1e-6
    database = build_database(model, rows, str(tmp_path), calibration_digest="tiny",
                              config=DatabaseConfig(**PLAIN_LADDERS))
    with torch.no_grad():
        dense_logits = model(rows).logits
    LiveAssembly(model, database).apply({(0, "mlp"): 5, (1, "attn"): 2, (2, "mlp"): 8})
    with torch.no_grad():
        pruned_logits = model(rows).logits
    exact = exact_kl_per_token(dense_logits, pruned_logits)
    assert exact > 0.05  # a real difference to measure
    compact = kl_per_token(model, teacher)
    assert compact <= exact + 1e-6 and exact - compact <= 1e-3  # coarsening never adds divergence


def test_finetuning_keeps_pruned_units_absent_and_rebuild_restores(tiny_setup):
    model, database = tiny_setup
    assembly = LiveAssembly(model, database)
    levels = {(0, "mlp"): 5, (1, "attn"): 2}
    assembly.apply(levels)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = finetune(model, random_token_rows(model.config.vocab_size, rows=4, seq_len=16),
                      FinetuneConfig(lr=1e-2, batch_size=2))
    assert len(losses) == 2
    assert {name: p.shape for name, p in model.named_parameters()} == shapes  # nothing grew back
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all("layers" in name and "norm" not in name for name in changed)
    assembly.apply(levels, rebuild=True)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assembly.apply({key: 0 for key in assembly.levels})


def test_selection_keeps_the_best_by_fitness(tiny_setup, monkeypatch):
    model, database = tiny_setup
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    search = Search(LiveAssembly(model, database), compute_teacher(model, rows, top_k=32), rows,
                    SearchConfig(generations=1, offspring=6, stages=(StageConfig(3, 16), StageConfig(1, 32))))
    scores = {}

    def fake_fitness(levels, teacher, train_rows):  # the same on every row: any lower score is significant
        return [scores.setdefault(levels, random.Random(str(levels)).random())] * teacher.input_ids.shape[0]

    monkeypatch.setattr(search, "evaluate_rows", fake_fitness)
    state = search.generation(search.load_or_start())
    parent = tuple(search.budget.uniform())
    stage_one = sorted((s, c) for c, s in scores.items() if c != parent)[:3]
    finalists = [c for _, c in stage_one] + [parent]
    assert tuple(state.parent) == min(finalists, key=lambda c: scores[c])
    assert state.parent_fitness == min(scores[c] for c in finalists)


@pytest.mark.parametrize("accept_z, replaced", [(0.0, True), (1.0, False)])
def test_a_challenger_must_beat_the_parent_by_accept_z_paired_standard_errors(tiny_setup, monkeypatch, accept_z,
                                                                            replaced):
    model, database = tiny_setup
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    search = Search(LiveAssembly(model, database), compute_teacher(model, rows, top_k=32), rows,
                    SearchConfig(generations=1, offspring=2, stages=(StageConfig(1, 64),), start="uniform",
                                 accept_z=accept_z))
    parent = tuple(search.budget.uniform())
    # Children beat the parent by 0.01 on average, but their per-row differences swing by ±0.1: z ≈ −0.17.
    differences = [-0.11, 0.09, -0.11, 0.09]

    def fake_fitness(levels, teacher, train_rows):
        assert teacher.input_ids.shape[0] == 4
        return [1.0] * 4 if levels == parent else [1.0 + d for d in differences]

    monkeypatch.setattr(search, "evaluate_rows", fake_fitness)
    state = search.generation(search.load_or_start())
    assert (tuple(state.parent) != parent) == replaced
    assert state.history[-1]["accepted"] == replaced
    assert state.history[-1]["paired_z"] == pytest.approx(-0.01 / (statistics.stdev(differences) / 2))
    assert state.parent_fitness == pytest.approx(0.99 if replaced else 1.0)


def test_move_size_never_shrinks_below_min_move_size(tiny_setup, monkeypatch):
    model, database = tiny_setup
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    search = Search(LiveAssembly(model, database), compute_teacher(model, rows, top_k=32), rows,
                    SearchConfig(generations=4, offspring=2, stages=(StageConfig(1, 32),), start="uniform",
                                 move_size=3, min_move_size=2))
    parent = tuple(search.budget.uniform())
    monkeypatch.setattr(search, "evaluate_rows", lambda levels, teacher, train: [0.0 if levels == parent else 1.0] * 2)
    state = search.run()  # every challenger loses: the 1/5 rule shrinks the move every generation
    assert [h["move_size"] for h in state.history] == [3, 2, 2, 2] and state.move_size == 2
    with pytest.raises(DarwinLMError, match="min_move_size"):
        SearchConfig(move_size=2, min_move_size=3)


def test_paired_z_is_the_mean_difference_over_its_standard_error():
    assert paired_z([1.0, 2.0, 3.0], [1.5, 2.5, 3.1]) == pytest.approx(
        statistics.fmean([-0.5, -0.5, -0.1]) / (statistics.stdev([-0.5, -0.5, -0.1]) / 3 ** 0.5))
    assert paired_z([1.0], [2.0]) is None
    assert paired_z([1.0, 1.0], [2.0, 2.0]) == float("-inf")


def search_config(generations: int) -> SearchConfig:
    # Training-aware stages and an informed start from KL slopes: every seeded draw a resumed run must redo.
    return SearchConfig(fraction_removed=0.5, generations=generations, offspring=4, seed=3,
                        stages=(StageConfig(2, 32, 32), StageConfig(1, 64, 32)),
                        finetune=FinetuneConfig(lr=1e-3, batch_size=2), start_slope_tokens=32)


def test_search_resumes_to_the_same_genome_after_a_kill(tiny_setup, tmp_path):
    model, database = tiny_setup
    pool = random_token_rows(model.config.vocab_size, rows=12, seq_len=16, seed=9)
    teacher = compute_teacher(model, pool, top_k=32)

    def fresh_search(state_uri, generations):
        # A new process would load the dense model again: the same weights, so the same database applies.
        return Search(LiveAssembly(tiny_model("llama", num_hidden_layers=4), database), teacher, pool,
                      search_config(generations), state_uri)

    uninterrupted = fresh_search(str(tmp_path / "full.json"), 3).run()
    # "Kill" after generation 2: a run with 3 generations configured, stopped by an exception mid-generation 3.
    killed = fresh_search(str(tmp_path / "resumed.json"), 3)
    calls = {"n": 0}
    original = killed.generation

    def dying_generation(state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(state)

    killed.generation = dying_generation
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = fresh_search(str(tmp_path / "resumed.json"), 3)
    assert resumed.load_or_start().generation == 2
    final = resumed.run()
    assert final.parent == uninterrupted.parent and final.generation == 3
    assert [h["accepted"] for h in final.history] == [h["accepted"] for h in uninterrupted.history]
    assert [h["best_fitness"] for h in final.history] == pytest.approx([h["best_fitness"] for h in uninterrupted.history])
    assert Budget.from_database(database, fraction_removed=0.5, seq_len=16).feasible(final.parent)


def test_search_refuses_a_state_from_another_config(tiny_setup, tmp_path):
    model, database = tiny_setup
    pool = random_token_rows(model.config.vocab_size, rows=12, seq_len=16, seed=9)
    teacher = compute_teacher(model, pool, top_k=32)
    fresh = lambda: LiveAssembly(tiny_model("llama", num_hidden_layers=4), database)  # noqa: E731
    Search(fresh(), teacher, pool, search_config(1), str(tmp_path / "s.json")).run()
    other = Search(fresh(), teacher, pool, search_config(2), str(tmp_path / "s.json"))
    with pytest.raises(DarwinLMError, match="another config"):
        other.run()


@pytest.mark.parametrize("stages, offspring_count", [
    ((StageConfig(2, 16), StageConfig(2, 16)), 4),  # last stage must keep exactly one
    ((StageConfig(5, 16), StageConfig(1, 16)), 4),  # keeps more than are made
    ((StageConfig(1, 16), StageConfig(2, 16)), 4),  # survivors must not grow
])
def test_search_config_rejects_bad_stage_schedules(stages, offspring_count):
    with pytest.raises(DarwinLMError):
        SearchConfig(stages=stages, offspring=offspring_count)


def test_a_switch_is_budget_neutral_so_repair_has_nothing_to_add(tiny_setup):
    from darwinlm.core.search.genome import Genome

    _, database = tiny_setup
    budget = Budget.from_database(database, fraction_removed=0.5, seq_len=32)
    parent = budget.uniform()
    rng = random.Random(1)
    repaired = 0
    for _ in range(200):
        levels = list(parent)
        assert budget_neutral_switch(levels, budget, rng)
        # the freed step is paid by steps of one cost class, to within such a step, never past the target
        assert abs(budget.cost(levels) - budget.cost(parent)) <= budget.tolerance
        assert budget.cost(levels) <= budget.target
        repaired += budget.repair(levels, rng) != tuple(levels)
    assert repaired <= 200 // 5  # only near the band's edges
    genome = Genome(parent, database.digest)
    assert Genome.from_json(genome.to_json()) == genome


def test_move_size_follows_the_one_fifth_rule():
    from darwinlm.core.search.genome import adapt_move_size

    assert adapt_move_size(3, 0.4, largest=6) == 4
    assert adapt_move_size(6, 0.4, largest=6) == 6
    assert adapt_move_size(3, 0.0, largest=6) == 2
    assert adapt_move_size(1, 0.0, largest=6) == 1
    assert adapt_move_size(3, 0.2, largest=6) == 3


def test_a_generation_the_parent_wins_records_no_paired_z(tiny_setup, monkeypatch):
    """When the parent ranks first there is no challenger to measure: a z of 0 would read as a measured tie."""
    model, database = tiny_setup
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    search = Search(LiveAssembly(model, database), compute_teacher(model, rows, top_k=32), rows,
                    SearchConfig(generations=2, offspring=3, stages=(StageConfig(2, 16), StageConfig(1, 48)),
                                 start="uniform"))
    parent = tuple(search.budget.uniform())
    parent_wins = {"yes": True}
    monkeypatch.setattr(search, "evaluate_rows", lambda levels, teacher, train: [
        (1.0 if levels == parent else 0.5 if not parent_wins["yes"] else 2.0) + 0.01 * row * (levels == parent)
        for row in range(teacher.input_ids.shape[0])])
    kept = search.generation(search.load_or_start())
    assert kept.history[0]["paired_z"] is None and kept.history[0]["accepted"] is False
    parent_wins["yes"] = False
    replaced = search.generation(kept)
    assert replaced.history[1]["paired_z"] < -1 and replaced.history[1]["accepted"] is True
