"""bench.neighbourhood's neighbours are exactly the search's smallest moves: one budget-neutral swap of one level
between two modules of one cost class, meeting the budget."""

import itertools

import pytest

from darwinlm.core.search.genome import Budget

neighbourhood = pytest.importorskip("bench.neighbourhood")  # bench is not a dependency of the suite


def test_swaps_are_every_same_class_swap_that_meets_the_budget():
    attention, mlp = tuple(range(40, -1, -10)), tuple(range(144, -1, -36))  # an MLP step costs 3.6 attention steps
    budget = Budget((attention, mlp, attention, mlp), target=2 * 20 + 2 * 72, tolerance=36, kind="params")
    levels = (2, 2, 2, 2)
    found = set(neighbourhood.swaps(levels, budget))
    brute = set()
    for raised, lowered in itertools.permutations(range(4), 2):
        candidate = list(levels)
        candidate[raised] += 1
        candidate[lowered] -= 1
        if raised % 2 == lowered % 2 and budget.feasible(candidate):
            brute.add((raised, lowered))
    assert found == brute == {(0, 2), (2, 0), (1, 3), (3, 1)}
    assert all(budget.cost(neighbourhood.swapped(levels, move)) == budget.cost(levels) for move in found)


def test_no_swap_past_the_last_or_first_level():
    costs = (20, 10, 0)
    budget = Budget((costs, costs), target=20, tolerance=10, kind="params")
    assert neighbourhood.swaps((2, 0), budget) == [(1, 0)]  # module 0 cannot go up, nor module 1 down
    assert neighbourhood.swaps((1, 1), budget) == [(0, 1), (1, 0)]


def test_combined_swaps_touch_disjoint_modules_best_first_and_keep_the_budget():
    costs = (30, 20, 10, 0)
    budget = Budget((costs,) * 4, target=4 * 15, tolerance=10, kind="params")  # every level sum 6 meets it
    levels = (1, 2, 1, 2)
    moves = [(0, 1), (1, 2), (2, 3), (3, 0)]  # best first; the second shares module 1 with the first
    genome, applied = neighbourhood.combined(levels, moves, budget)
    assert applied == [(0, 1), (2, 3)] and genome == (2, 1, 2, 1)
    assert budget.feasible(genome)
    uneven = (30, 20, 15, 0)  # module 2's step down adds 10, module 0's step up frees 5
    tight = Budget((uneven,) * 4, target=70, tolerance=10, kind="params")
    assert tight.feasible(levels)
    assert neighbourhood.combined(levels, [(0, 2), (1, 3)], tight) == ((1, 3, 1, 1), [(1, 3)])  # (0, 2): over it
