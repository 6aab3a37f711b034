"""Prefix reuse: candidates measured on the same rows keep the blocks below their first changed module, and the
KL is bit for bit what a full forward pass gives, so a search ends where it would without the reuse."""

import random

import pytest
import torch

from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
from darwinlm.core.search.fitness import compute_teacher, kl_per_row
from darwinlm.core.search.genome import Budget, Genome, module_keys, offspring
from darwinlm.core.search.prefix import PrefixReuse
from tests.support.tiny_models import TINY_FAMILIES, random_token_rows, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _pruned_setup(family: str, tmp_path):
    model = tiny_model(family, num_hidden_layers=4)
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    database = build_database(model, rows, str(tmp_path), calibration_digest="tiny",
                              config=DatabaseConfig(storage_dtype="float32"))
    return model, database, rows


def _candidates(database, count: int = 6) -> list[tuple[int, ...]]:
    """Uniform 50% and some of its offspring: genomes that share the lower blocks in varying amounts."""
    budget = Budget.from_database(database, fraction_removed=0.5, seq_len=16)
    parent = budget.uniform()
    return [parent] + offspring(parent, count, budget, random.Random(0))


def _reuse(model, database, batch_size: int = 2, **kwargs) -> PrefixReuse:
    return PrefixReuse(model, [layer for layer, _ in module_keys(database)], batch_size, **kwargs)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reused_prefixes_give_the_full_passes_kl_bit_for_bit(family, tmp_path):
    model, database, rows = _pruned_setup(family, tmp_path)
    teacher = compute_teacher(model, rows[:3], top_k=32)  # 3 rows in batches of 2: a ragged last batch
    assembly, reuse = LiveAssembly(model, database), _reuse(model, database)
    genomes = [_candidates(database)[index] for index in reuse.evaluation_order(_candidates(database))]
    for levels in genomes + genomes[-1:]:  # the last one again: every block is kept, only the head runs
        assembly.apply(Genome(levels, database.digest).assignment())
        assert reuse.kl_per_row(levels, teacher) == kl_per_row(model, teacher, batch_size=2)
    assert reuse.verified is True
    assert reuse.reused_blocks >= 4 and reuse.run_blocks < 4 * (len(genomes) + 1)


def test_new_rows_start_again_from_the_first_block(tmp_path):
    model, database, rows = _pruned_setup("llama", tmp_path)
    assembly, reuse = LiveAssembly(model, database), _reuse(model, database)
    levels = _candidates(database)[1]
    assembly.apply(Genome(levels, database.digest).assignment())
    for teacher in (compute_teacher(model, rows[:2], top_k=32), compute_teacher(model, rows[2:4], top_k=32)):
        assert reuse.kl_per_row(levels, teacher) == kl_per_row(model, teacher, batch_size=2)
    assert reuse.reused_blocks == 0 and reuse.run_blocks == 8


def test_a_model_the_blocks_do_not_reproduce_is_measured_by_full_passes(tmp_path, monkeypatch):
    model, database, rows = _pruned_setup("llama", tmp_path)
    teacher = compute_teacher(model, rows[:2], top_k=32)
    original = BlockDriver.head_logits
    # as if the model's forward did more after the head than the driver knows of (a logit soft-cap, say)
    monkeypatch.setattr(BlockDriver, "head_logits", lambda self, hidden: original(self, hidden) * 1.001)
    assembly, reuse = LiveAssembly(model, database), _reuse(model, database)
    for levels in _candidates(database, 2):
        assembly.apply(Genome(levels, database.digest).assignment())
        assert reuse.kl_per_row(levels, teacher) == kl_per_row(model, teacher, batch_size=2)
    assert reuse.verified is False and reuse.run_blocks == 4  # the first measurement's check, then none


def test_rows_whose_block_inputs_exceed_the_memory_bound_get_full_passes(tmp_path):
    model, database, rows = _pruned_setup("llama", tmp_path)
    teacher = compute_teacher(model, rows[:2], top_k=32)
    one_row_set = 5 * teacher.input_ids.numel() * model.config.hidden_size * 4  # 4 blocks' inputs + the output
    assembly = LiveAssembly(model, database)
    for max_bytes, reused in ((one_row_set - 1, False), (one_row_set, True)):
        reuse = _reuse(model, database, max_bytes=max_bytes)
        for levels in _candidates(database, 2):
            assembly.apply(Genome(levels, database.digest).assignment())
            assert reuse.kl_per_row(levels, teacher) == kl_per_row(model, teacher, batch_size=2)
        assert (reuse.run_blocks > 0) == reused


@pytest.mark.parametrize("finetune_tokens", [0, 16], ids=["one-shot", "training-aware"])
def test_a_search_reusing_prefixes_ends_exactly_where_full_passes_do(tmp_path, finetune_tokens):
    model, database, _ = _pruned_setup("llama", tmp_path)
    pool = random_token_rows(model.config.vocab_size, rows=12, seq_len=16, seed=9)
    teacher = compute_teacher(model, pool, top_k=32)
    config = SearchConfig(generations=4, offspring=4, stages=(StageConfig(2, 16, finetune_tokens), StageConfig(1, 32)),
                          start_slope_tokens=16, accept_z=0.0, batch_size=2)

    def run(reuse: bool):
        search = Search(LiveAssembly(tiny_model("llama", num_hidden_layers=4), database), teacher, pool, config)
        if not reuse:
            search.prefix.verified = False  # what a model the blocks do not reproduce gets: full passes only
        return search, search.run()

    (reusing, reused_state), (full, full_state) = run(True), run(False)
    assert reusing.prefix.reused_blocks > 0 and full.prefix.run_blocks == 0
    assert reused_state.parent == full_state.parent and reused_state.start == full_state.start
    for key in ("best_fitness", "fixed_kl", "challenger_fitness", "median_fitness", "accepted", "paired_z"):
        assert [h[key] for h in reused_state.history] == [h[key] for h in full_state.history], key
