"""bench.demo times a compression, never a resume: it runs into its own store, emptied first."""

import json
import sys

from bench import demo as demo_bench


def test_the_demo_bench_compresses_from_an_empty_store_of_its_own(tmp_path, monkeypatch):
    home = tmp_path / "home"
    stale = home / "bench-demo" / "runs" / "finished-run" / "genome.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # what a previous measurement leaves: resuming from it would cost nothing
    monkeypatch.setenv("DARWINLM_HOME", str(home))
    monkeypatch.setattr(demo_bench, "write_results", lambda name, results, **_: written.update(results))
    monkeypatch.setattr(sys, "argv", ["bench.demo"])
    calls, written = [], {}

    def compress(argv):
        store = argv[argv.index("--store") + 1]
        calls.append((argv[:3], store, stale.exists()))
        table = {key: 1 for key in ("wall_s", "dense", "pruned", "evaluation_labels", "kept_block_fraction",
                                    "model_uri", "mlflow_run_id")}
        with open(argv[argv.index("--results") + 1], "w") as results:
            json.dump(table, results)
        return 0

    monkeypatch.setattr("darwinlm.flows.cli.main", compress)
    demo_bench.main()
    assert calls == [(["compress", "--preset", "smollm2-demo"], str(home / "bench-demo"), False)]
    assert written["wall_s"] == 1


def test_the_demo_bench_times_a_second_seed_in_the_same_store(tmp_path, monkeypatch):
    """--rerun-seed: the second compression differs only in its search seed and runs into the first's store,
    so it reuses the stored dense-model work; both runs' figures are recorded."""
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(demo_bench, "write_results", lambda name, results, **_: written.update(results))
    monkeypatch.setattr(sys, "argv", ["bench.demo", "--rerun-seed", "3"])
    calls, written = [], {}

    def compress(argv):
        calls.append(argv[: argv.index("--results")])
        seeded = "--seed" in argv
        table = {"wall_s": 2 if seeded else 5, "dense": {"ppl": 1, "prefill_tokens_per_s": 7 if seeded else 8},
                 "pruned": {"ppl": 4 if seeded else 3},
                 "evaluation_labels": {}, "kept_block_fraction": 0.5, "model_uri": f"run-{seeded}",
                 "mlflow_run_id": "x"}
        with open(argv[argv.index("--results") + 1], "w") as results:
            json.dump(table, results)
        return 0

    monkeypatch.setattr("darwinlm.flows.cli.main", compress)
    demo_bench.main()
    store = str(tmp_path / "home" / "bench-demo")
    assert calls == [["compress", "--preset", "smollm2-demo", "--store", store],
                     ["compress", "--preset", "smollm2-demo", "--store", store, "--seed", "3"]]
    assert written["wall_s"] == 5 and written["pruned"] == {"ppl": 3}
    assert written["rerun"] == {"seed": 3, "wall_s": 2, "pruned": {"ppl": 4}, "model_uri": "run-True",
                                "dense_as_first_run": True}
