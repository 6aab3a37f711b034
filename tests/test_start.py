"""The informed start: the budget-exact DP equals brute force, and per-level errors come with the database."""

import itertools
import random

import pytest

from darwinlm.core.search.genome import Budget
from darwinlm.core.search.start import allocate, kl_weights


def _brute_force(budget: Budget, errors, weights) -> float:
    best = float("inf")
    for levels in itertools.product(*(range(len(c)) for c in budget.costs)):
        if budget.feasible(levels):
            best = min(best, sum(w * e[level] for w, e, level in zip(weights, errors, levels)))
    return best


def _random_problem(seed: int, modules: int = 5, levels: int = 4):
    rng = random.Random(seed)
    costs, errors = [], []
    for _ in range(modules):
        dense = rng.choice([12, 18, 30])
        steps = sorted(rng.sample(range(1, dense), levels - 2), reverse=True)
        costs.append((dense, *steps, 0))
        # errors rise with pruning, each module at its own rate
        scale = rng.uniform(0.1, 3.0)
        errors.append([0.0] + sorted(scale * rng.random() for _ in range(levels - 1)))
    dense_total = sum(c[0] for c in costs)
    tolerance = max(c[i] - c[i + 1] for c in costs for i in range(len(c) - 1))
    budget = Budget(tuple(costs), int(dense_total * rng.uniform(0.3, 0.7)), tolerance, "params")
    weights = [rng.uniform(0.5, 2.0) for _ in range(modules)]
    return budget, errors, weights


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_the_brute_force_optimum_within_the_budget(seed):
    budget, errors, weights = _random_problem(seed)
    levels = allocate(budget, errors, weights)
    assert budget.feasible(levels), (budget.cost(levels), budget.target, budget.tolerance)
    found = sum(w * e[level] for w, e, level in zip(weights, errors, levels))
    assert found == pytest.approx(_brute_force(budget, errors, weights))


def test_allocation_with_coarsened_costs_still_keeps_the_budget(monkeypatch):
    from darwinlm.core.search import start

    budget, errors, _ = _random_problem(3, modules=8, levels=5)
    monkeypatch.setattr(start, "MAX_STATES", 7)  # forces a unit far above the costs' gcd
    levels = allocate(budget, errors)
    assert budget.feasible(levels)


def test_allocation_prefers_the_module_whose_errors_are_small():
    costs = ((10, 5, 0), (10, 5, 0))
    budget = Budget(costs, 10, 5, "params")
    cheap, dear = [0.0, 0.1, 0.2], [0.0, 0.5, 1.0]
    assert allocate(budget, [cheap, dear]) == (2, 0)
    assert allocate(budget, [dear, cheap]) == (0, 2)
    assert allocate(budget, [cheap, dear], weights=[10.0, 1.0]) == (0, 2)


def test_kl_weights_are_the_kl_slopes_and_never_zero():
    costs = ((10, 5, 0), (10, 5, 0), (10, 5, 0))
    budget = Budget(costs, 15, 5, "params")
    errors = [[0.0, 0.2, 1.0], [0.0, 0.4, 1.0], [0.0, 0.1, 1.0]]
    # a fake KL: module 0 matters 3× per unit of error, module 1 once, module 2 looks free (noise)
    slopes = [3.0, 1.0, 0.0]

    def kl_of(levels):
        return sum(s * e[level] for s, e, level in zip(slopes, errors, levels))

    weights = kl_weights((1, 1, 1), budget, errors, kl_of)
    assert weights[0] == pytest.approx(3.0) and weights[1] == pytest.approx(1.0)
    assert weights[2] == pytest.approx(0.25 * 3.0)  # non-positive slope → a quarter of the median (3.0 of 1, 3)


def _planted_model(critical: int):
    """A tiny Llama in which layer `critical` matters: its output projections are large and every unit
    carries equal weight, while in the other layers a few units carry nearly all of the output."""
    import torch

    from tests.support.tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=4, seed=1)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if index == critical:
                    linear.weight.mul_(3.0)
                else:  # a quarter of the input units keep their weight, the rest are nearly silent
                    columns = linear.weight.shape[1]
                    linear.weight[:, columns // 4:] *= 0.05
    return model


def test_planted_importance_is_kept_by_the_start_and_the_search(tmp_path):
    import torch

    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.store import DatabaseConfig, build_database
    from darwinlm.core.search.fitness import compute_teacher, kl_per_token
    from darwinlm.core.search.genome import Genome
    from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
    from darwinlm.core.search.start import database_errors
    from tests.support.tiny_models import PLAIN_LADDERS, random_token_rows

    torch.set_num_threads(1)
    critical = 2
    model = _planted_model(critical)
    calibration = random_token_rows(model.config.vocab_size, rows=16, seq_len=32, seed=0)
    database = build_database(model, calibration, str(tmp_path), calibration_digest="planted",
                              config=DatabaseConfig(storage_dtype="float32", **PLAIN_LADDERS))
    pool = compute_teacher(model, random_token_rows(model.config.vocab_size, rows=12, seq_len=32, seed=1), top_k=64)
    held_out = compute_teacher(model, random_token_rows(model.config.vocab_size, rows=8, seq_len=32, seed=2), top_k=64)
    config = SearchConfig(fraction_removed=0.5, generations=4, offspring=4, seed=0,
                          stages=(StageConfig(2, 64), StageConfig(1, 128)), fixed_rows=2)
    search = Search(LiveAssembly(model, database), pool, pool.input_ids, config)
    uniform = search.budget.uniform()
    informed = search.choose_start()[0]
    final = tuple(search.run().parent)

    def critical_levels(levels):
        return levels[2 * critical], levels[2 * critical + 1]

    def held_out_kl(levels):
        search.assembly.apply(Genome(levels, database.digest).assignment(), rebuild=True)
        return kl_per_token(search.assembly.model, held_out)

    assert database_errors(database)[2 * critical + 1][-1] == pytest.approx(1.0)  # all removed: all the error
    for levels in (informed, final):
        assert search.budget.feasible(levels)
        assert all(c < u for c, u in zip(critical_levels(levels), critical_levels(uniform))), (levels, uniform)
        assert held_out_kl(levels) < held_out_kl(uniform)


def test_allocation_stays_within_the_trust_region():
    budget, errors, weights = _random_problem(5, modules=6, levels=6)
    around = budget.uniform()
    levels = allocate(budget, errors, weights, around=around, radius=1)
    assert budget.feasible(levels)
    assert all(abs(a - b) <= 1 for a, b in zip(levels, around))
    free = allocate(budget, errors, weights)
    bounded = sum(w * e[l] for w, e, l in zip(weights, errors, levels))
    assert bounded >= sum(w * e[l] for w, e, l in zip(weights, errors, free)) - 1e-12  # a constraint never helps
