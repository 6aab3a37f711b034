"""Interleaved medians: every contender is measured in every round, in rotated order, after a warm-up."""

import itertools

from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds


def test_rounds_rotate_the_order_and_the_median_ignores_a_stall():
    order, values = [], {"a": iter([100.0, 1.0, 2.0, 3.0]), "b": iter([50.0, 7.0, 9.0, 8.0])}

    def measure(name):
        def call():
            order.append(name)
            return next(values[name])
        return call

    medians = interleaved_medians({"a": measure("a"), "b": measure("b")}, 3, warmup=True)
    assert medians == {"a": 2.0, "b": 8.0}  # the warm-up values (100, 50) are dropped
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a-first, b-first, a-first


def test_prepare_runs_untimed_before_each_call_and_dict_measures_get_per_key_medians():
    prepared, counter = [], itertools.count()
    medians = interleaved_medians({"x": lambda: {"prefill": next(counter), "decode": 1.0}}, 3, warmup=False,
                                  prepare={"x": lambda: prepared.append("swap")})
    assert medians == {"x": {"prefill": 1, "decode": 1.0}} and prepared == ["swap"] * 3
    assert timed_seconds(lambda: sum(range(1000))) >= 0.0


def test_a_resumed_measurement_goes_on_from_its_earlier_rounds_in_the_same_rotation():
    """`earlier` holds whole rounds measured before (a stopped run's): only the rounds after them run, in the
    order an unbroken run would have used, and the medians cover all of them."""
    order = []
    measures = {name: (lambda name=name: order.append(name) or float(len(order))) for name in ("a", "b", "c")}
    medians = interleaved_medians(measures, 3, warmup=False, earlier={"a": [100.0], "b": [100.0], "c": [100.0]})
    assert order == ["b", "c", "a", "c", "a", "b"]  # rounds 2 and 3, rotated as they would have been
    assert medians == {"a": 5.0, "b": 6.0, "c": 4.0}  # a: 100, 3, 5; b: 100, 1, 6; c: 100, 2, 4
