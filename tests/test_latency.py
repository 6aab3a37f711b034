"""Latency-aware budgets, measured in torch and in llama.cpp: the table's shape, its storage next to the database,
a llama.cpp measurement that resumes, per-module costs recovered from whole-model times, and searches that hold a
latency budget."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from darwinlm.core.export import gguf as gguf_writer
from darwinlm.core.search import latency
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.fitness import compute_teacher
from darwinlm.core.search.genome import Budget, cost_text
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
from tests.support.tiny_models import TINY_BPE_VOCAB, random_token_rows, tiny_bpe_tokenizer, tiny_model

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


# ---------------------------------------------------------------------------------------------- llama.cpp tables
# A tiny llama with SmolLM2's grouping (6 query heads in 2 KV groups) and 128 MLP channels at alignment 32: its
# attention has 4 levels and its MLP 5, so llama.cpp times dense, the reference (levels 1 and 2) and 3 + 4 variants.
LLAMA_SHAPE = dict(vocab_size=TINY_BPE_VOCAB, num_hidden_layers=3, hidden_size=96, num_attention_heads=6,
                   num_key_value_heads=2, intermediate_size=128, head_dim=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(live assembly, its tokenizer, calibration rows) of a tiny llama exportable to GGUF."""
    model = tiny_model("llama", **LLAMA_SHAPE)
    rows = random_token_rows(TINY_BPE_VOCAB, rows=8, seq_len=32, seed=2)
    database = build_database(model, rows, str(tmp_path_factory.mktemp("db")), calibration_digest="c",
                              config=DatabaseConfig(mlp_alignment=32, storage_dtype="float32"))
    return LiveAssembly(model, database), tiny_bpe_tokenizer(), rows


def test_llama_cpp_table_times_every_group_and_level_in_real_gguf_files(served, tmp_path):
    live, tokenizer, _ = served
    before = dict(live.levels)
    table = latency.measure_llama_cpp_table(live, tokenizer, seq_len=32, threads=1, repeats=2,
                                            scratch=tmp_path / "scratch")
    assert live.levels == before and not (tmp_path / "scratch").exists()  # model as found, GGUFs cleaned up
    assert table["engine"] == "llama.cpp" and table["device"] == "llama.cpp-f16-1threads"
    assert set(table["variant_seconds"]) == set(latency._llama_cpp_variants(live)) and len(
        table["variant_seconds"]) == 9
    assert len(table["modules"]) == 6 and table["rest_s"] >= 0 and table["dense_forward_s"] > 0
    for module in table["modules"]:
        seconds = module["seconds"]
        assert len(seconds) == live.database.num_levels(module["layer"], module["kind"]) and seconds[-1] == 0.0
        assert all(a >= b >= 0 for a, b in zip(seconds, seconds[1:]))


def test_llama_cpp_table_predicts_an_additive_engine_exactly(served, tmp_path, monkeypatch):
    """Per-module costs are recovered from whole-model times: with an engine whose prefill is exactly
    rest + Σ module costs, the table predicts any genome's time, not just the variants'."""
    live, tokenizer, _ = served
    cost = {"attn": [5.0, 3.0, 2.0, 0.5], "mlp": [4.0, 3.5, 2.0, 1.0, 0.25]}
    rest = 7.0
    paths = {}

    def engine_seconds(path, prompt, threads):
        levels = latency._llama_cpp_variants(live)[paths[path]]
        return rest + sum(cost[kind][level] for (_, kind), level in levels.items())

    real_write = latency._write_variant_ggufs
    def write(assembly, tokenizer, variants, scratch, quant, progress):
        files = real_write(assembly, tokenizer, variants, scratch, quant, progress)
        paths.update({path: name for name, path in files.items()})
        return files

    monkeypatch.setattr(latency, "_write_variant_ggufs", write)
    monkeypatch.setattr(latency, "gguf_prefill_seconds", engine_seconds)
    table = latency.measure_llama_cpp_table(live, tokenizer, seq_len=32, threads=1, repeats=1, scratch=tmp_path)
    removed = {"attn": 0.5, "mlp": 0.25}  # what the removed level still costs goes to `rest`
    assert table["rest_s"] == pytest.approx(rest + 3 * sum(removed.values()))
    genome = {(0, "attn"): 1, (0, "mlp"): 3, (1, "attn"): 3, (1, "mlp"): 0, (2, "attn"): 2, (2, "mlp"): 4}
    actual = rest + sum(cost[kind][level] for (_, kind), level in genome.items())
    dense = rest + 3 * (cost["attn"][0] + cost["mlp"][0])
    assert latency.predicted_speedup(table, genome) == pytest.approx(dense / actual)
    # the numerator is the measured dense time, not the table's sum (they differ when savings are not additive)
    slower_dense = {**table, "dense_forward_s": 2 * table["dense_forward_s"]}
    assert latency.predicted_speedup(slower_dense, genome) == pytest.approx(2 * dense / actual)


def test_llama_cpp_measurement_resumes_after_its_last_whole_round(served, tmp_path, monkeypatch):
    live, tokenizer, _ = served
    partial = str(tmp_path / "table.json.partial")
    calls, exports = [], []
    real_export = gguf_writer.export_gguf
    monkeypatch.setattr(gguf_writer, "export_gguf", lambda *a, **k: exports.append(a[2]) or real_export(*a, **k))

    def crashing(path, prompt, threads):
        calls.append(path)
        if len(calls) == 9 + 3:  # all of round 1, then 3 variants into round 2
            raise KeyboardInterrupt
        return 0.01 * len(calls)

    monkeypatch.setattr(latency, "gguf_prefill_seconds", crashing)
    with pytest.raises(KeyboardInterrupt):
        latency.measure_llama_cpp_table(live, tokenizer, seq_len=32, threads=1, repeats=3, partial_uri=partial,
                                        scratch=tmp_path / "scratch")
    assert all(len(values) == 1 for values in json.loads(Path(partial).read_text()).values())
    assert len(exports) == 9
    calls.clear()
    monkeypatch.setattr(latency, "gguf_prefill_seconds", lambda path, prompt, threads: calls.append(path) or 0.01)
    table = latency.measure_llama_cpp_table(live, tokenizer, seq_len=32, threads=1, repeats=3, partial_uri=partial,
                                            scratch=tmp_path / "scratch")
    assert len(calls) == 9 * 2 and len(exports) == 9  # rounds 2 and 3 only; no GGUF written twice
    assert table["repeats"] == 3


def test_llama_cpp_table_is_stored_with_the_database_and_reused(served, monkeypatch, tmp_path):
    live, tokenizer, _ = served
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path))  # the GGUF scratch folder lives under the data home
    with pytest.raises(DarwinLMError, match="tokenizer"):
        latency.load_or_measure(live, seq_len=32, engine="llama.cpp")
    with pytest.raises(DarwinLMError, match="unknown latency engine 'vllm'"):
        latency.load_or_measure(live, seq_len=32, engine="vllm")
    monkeypatch.setattr(latency, "gguf_prefill_seconds", lambda path, prompt, threads: 0.01)
    first = latency.load_or_measure(live, seq_len=32, engine="llama.cpp", tokenizer=tokenizer, threads=1)
    uri = latency.table_uri(live.database.root, "llama.cpp-f16-1threads", 1, 32)
    assert json.loads(Path(uri).read_text()) == first and not Path(uri + ".partial").exists()
    monkeypatch.setattr(latency, "measure_llama_cpp_table", lambda *a, **k: pytest.fail("measured twice"))
    assert latency.load_or_measure(live, seq_len=32, engine="llama.cpp", tokenizer=tokenizer, threads=1) == first


def test_search_holds_a_budget_priced_in_llama_cpp(served, monkeypatch, tmp_path):
    live, tokenizer, rows = served
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path))
    with pytest.raises(DarwinLMError, match="latency_engine 'onnx'"):
        SearchConfig(budget_kind="latency", latency_engine="onnx")
    config = SearchConfig(fraction_removed=0.4, budget_kind="latency", latency_engine="llama.cpp",
                          latency_threads=1, generations=2, offspring=3, batch_size=1, stages=(StageConfig(1, 32),))
    teacher = compute_teacher(live.model, rows, top_k=16)
    stored = Path(latency.table_uri(live.database.root, "llama.cpp-f16-1threads", 1, 32))
    stored.unlink(missing_ok=True)  # measure for real, not the stand-in timings an earlier test stored
    with pytest.raises(DarwinLMError, match="tokenizer"):
        Search(live, teacher, rows, config)
    search = Search(live, teacher, rows, config, tokenizer=tokenizer)
    state = search.run()
    table = latency.load_or_measure(live, seq_len=32, engine="llama.cpp", tokenizer=tokenizer, threads=1)
    assert table["engine"] == "llama.cpp"
    levels = search.genome(state).assignment()
    seconds = {(m["layer"], m["kind"]): m["seconds"] for m in table["modules"]}
    kept = sum(seconds[key][level] for key, level in levels.items())
    assert search.budget.feasible(tuple(state.parent))
    assert kept <= 0.6 * sum(s[0] for s in seconds.values()) + 1e-9


def test_run_names_say_what_a_budget_counts():
    assert SearchConfig(fraction_removed=0.5).target_label == "−50%"
    assert SearchConfig(fraction_removed=0.3, budget_kind="flops").target_label == "−30% flops"
    assert SearchConfig(budget_kind="latency", latency_engine="llama.cpp").target_label == "−50% latency (llama.cpp)"
    assert cost_text("latency", 553_845_928) == "553.8 ms of module prefill"  # a latency budget counts nanoseconds
    assert cost_text("params", 53_084_160) == "53,084,160 parameters"


def test_the_latency_options_left_at_their_defaults_keep_a_search_s_name():
    """Searches and runs saved before latency_engine and latency_threads existed keep their names (the resume of a
    run started with the earlier version); a llama.cpp-priced search is named apart."""
    plain = SearchConfig()
    assert not {"latency_engine", "latency_threads"} & set(plain.address_values())
    assert set(plain.address_values()) | {"latency_engine", "latency_threads"} == set(asdict(plain))
    served = SearchConfig(budget_kind="latency", latency_engine="llama.cpp", latency_threads=4)
    assert served.address_values()["latency_engine"] == "llama.cpp" and served.digest != SearchConfig(
        budget_kind="latency").digest
