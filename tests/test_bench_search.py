"""bench.search's schedule: the smollm2-demo preset with the bench's arguments laid over it."""

from types import SimpleNamespace

import pytest

# bench is not a dependency of the suite (tests never import it); like test_peer, skip where it is absent
search_bench = pytest.importorskip("bench.search")


def arguments(**overrides) -> SimpleNamespace:
    values = dict(model="smollm2", fitness_rows=68, generations=20, offspring=6, task_limit=0, informed_every=None,
                  confirm_tokens=None, accept_z=None, surrogate_screen=None, kl_skip_tokens=None)
    return SimpleNamespace(**{**values, **overrides})


def test_the_informed_step_interval_comes_from_the_arguments_else_from_the_preset():
    from darwinlm.core.config import load_preset

    preset = load_preset("smollm2-demo").search
    given = search_bench.bench_preset(arguments(informed_every=5), 0.3).search
    assert (given.informed_every, given.fraction_removed, given.generations) == (5, 0.3, 20)
    assert search_bench.bench_preset(arguments(), 0.5).search.informed_every == preset.informed_every


def test_the_confirmation_comes_from_the_arguments_else_from_the_preset():
    from darwinlm.core.config import load_preset

    assert search_bench.bench_preset(arguments(confirm_tokens=1536), 0.5).search.confirm_tokens == 1536
    assert (search_bench.bench_preset(arguments(), 0.5).search.confirm_tokens
            == load_preset("smollm2-demo").search.confirm_tokens)


def test_the_acceptance_margin_comes_from_the_arguments_else_from_the_preset():
    from darwinlm.core.config import load_preset

    assert search_bench.bench_preset(arguments(accept_z=0.5), 0.5).search.accept_z == 0.5
    assert search_bench.bench_preset(arguments(), 0.5).search.accept_z == load_preset("smollm2-demo").search.accept_z


def test_the_surrogate_screen_comes_from_the_arguments_else_from_the_preset():
    from darwinlm.core.config import load_preset

    assert search_bench.bench_preset(arguments(surrogate_screen=4), 0.5).search.surrogate_screen == 4
    assert (search_bench.bench_preset(arguments(), 0.5).search.surrogate_screen
            == load_preset("smollm2-demo").search.surrogate_screen)


def test_the_skipped_context_positions_come_from_the_arguments_else_from_the_preset():
    from darwinlm.core.config import load_preset

    assert search_bench.bench_preset(arguments(kl_skip_tokens=32), 0.5).search.kl_skip_tokens == 32
    assert (search_bench.bench_preset(arguments(), 0.5).search.kl_skip_tokens
            == load_preset("smollm2-demo").search.kl_skip_tokens)


def test_a_namespace_without_the_search_settings_gets_the_preset_s():
    from darwinlm.core.config import load_preset

    bare = SimpleNamespace(model="smollm2", fitness_rows=68, generations=20, offspring=6, task_limit=0)
    assert search_bench.bench_preset(bare, 0.5).search == search_bench.bench_preset(arguments(), 0.5).search
    assert search_bench.bench_preset(bare, 0.5).search.accept_z == load_preset("smollm2-demo").search.accept_z


def test_the_matched_one_shot_is_the_plain_search_whatever_its_reference_ran():
    from darwinlm.core.config import load_preset

    search = search_bench.bench_preset(arguments(informed_every=5, confirm_tokens=1536, accept_z=0.25), 0.5).search
    reference = search_bench.method_config("oneshot", search, 1, 1024)
    assert (reference.informed_every, reference.confirm_tokens, reference.accept_z) == (5, 1536, 0.25)
    matched = search_bench.method_config("oneshot_matched", search, 1, 1024)
    assert (matched.informed_every, matched.confirm_tokens, matched.seed) == (0, 0, 1)
    assert matched.accept_z == load_preset("smollm2-demo").search.accept_z
    assert all(stage.finetune_tokens == 0 for stage in matched.stages)


def test_the_matched_one_shot_needs_its_reference_method_run_before_it(capsys):
    args = search_bench.parse_arguments(["--methods", "oneshot,oneshot_matched", "--match", "oneshot"])
    assert (args.methods, args.match) == (["oneshot", "oneshot_matched"], "oneshot")
    with pytest.raises(SystemExit) as stopped:
        search_bench.parse_arguments(["--methods", "oneshot,oneshot_matched"])  # --match is trainaware by default
    assert stopped.value.code == 2
    assert "oneshot_matched needs trainaware before it" in capsys.readouterr().err


def test_the_schedule_defaults_to_the_demo_preset_s():
    from darwinlm.core.config import load_preset

    demo = load_preset("smollm2-demo")
    args = search_bench.parse_arguments([])
    assert (args.generations, args.offspring, args.fitness_rows) == (demo.search.generations, demo.search.offspring,
                                                                     demo.data.fitness_rows)
    assert search_bench.bench_preset(args, 0.5).search == demo.search
