"""Rows of text the dense model writes itself: how they are sampled, where they go in the search's selection pool,
and that nothing but selection reads them."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from darwinlm.core.compression import build_search, generated_rows, selection_ids
from darwinlm.core.config import load_preset
from darwinlm.core.data.generated import document_start_token, sample_rows, selection_rows
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
from darwinlm.core.search.fitness import compute_teacher
from tests.support.tiny_models import random_token_rows, tiny_bpe_tokenizer, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def numbered_rows(values) -> torch.Tensor:
    """Rows of 3 tokens, each row all one value: a row's first token names it."""
    return torch.tensor(values).view(-1, 1).expand(-1, 3).contiguous()


def test_generated_rows_are_spread_evenly_and_the_pools_own_rows_keep_their_order():
    pool, generated = numbered_rows(range(8)), numbered_rows([-1, -2, -3, -4])
    assert selection_rows(pool, generated)[:, 0].tolist() == [0, -1, 1, -2, 2, -3, 3, -4]
    assert selection_rows(pool, generated[:2])[:, 0].tolist() == [0, 1, 2, -1, 3, 4, 5, -2]
    assert torch.equal(selection_rows(pool, generated[:0]), pool)
    with pytest.raises(DarwinLMError, match="at most as many rows"):
        selection_rows(pool[:3], generated)


def test_sampled_rows_start_a_fresh_document_are_seeded_and_leave_the_global_generator_alone():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    before = torch.random.get_rng_state()
    rows = sample_rows(model, tokenizer, count=3, seq_len=12, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert rows.shape == (3, 12) and rows.dtype == torch.int64
    assert rows[:, 0].tolist() == [tokenizer.eos_token_id] * 3  # no BOS before text and no <|endoftext|>: EOS
    assert len({tuple(row) for row in rows.tolist()}) == 3  # sampled, not greedy
    assert torch.equal(sample_rows(model, tokenizer, count=3, seq_len=12, seed=0), rows)
    assert not torch.equal(sample_rows(model, tokenizer, count=3, seq_len=12, seed=1), rows)


def test_the_document_start_is_the_bos_put_before_text_else_the_document_separator():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    assert document_start_token(tiny_bpe_tokenizer()) == 0  # <|endoftext|>, as SmolLM2's pretraining text
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "<bos>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                       unk_token="<unk>")
    assert document_start_token(with_bos) == 2  # as Llama and Gemma start documents


def test_the_selection_pool_is_the_teacher_pool_past_its_fixed_rows_with_generated_rows_among_them():
    config = load_preset("tiny")  # 8 teacher-pool rows, 4 of them fixed; generated_share 0.5 by default
    data = SimpleNamespace(teacher_pool_ids=numbered_rows(range(8)))
    made = generated_rows(config, tiny_model("llama"), tiny_tokenizer())
    assert made.shape == (2, config.data.seq_len)
    mixed = selection_ids(config, data, numbered_rows([-1, -2]))
    assert mixed[:, 0].tolist() == [4, -1, 5, -2]
    plain = dataclasses.replace(config, search=dataclasses.replace(config.search, generated_share=0.0))
    assert generated_rows(plain, None, None) is None and selection_ids(plain, data, None) is None


def test_a_search_that_mixes_generated_rows_refuses_to_start_without_their_teacher():
    with pytest.raises(DarwinLMError, match="generated_share"):
        build_search(load_preset("tiny"), assembly=None, data=None, teacher=None)  # checked before anything is read


def test_selection_reads_only_the_selection_pool_and_the_start_only_real_text(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    real = random_token_rows(model.config.vocab_size, rows=8, seq_len=16, seed=1)
    made = random_token_rows(model.config.vocab_size, rows=4, seq_len=16, seed=2)
    database = build_database(model, real, str(tmp_path / "db"), calibration_digest="tiny",
                              config=DatabaseConfig(storage_dtype="float32"))
    config = SearchConfig(generations=2, offspring=2, stages=(StageConfig(1, 64),), start="best",
                          start_slope_tokens=32, fixed_rows=2)
    selection = compute_teacher(model, selection_rows(real[2:], made[:3]), top_k=32)
    search = Search(LiveAssembly(model, database), compute_teacher(model, real, top_k=32), real, config,
                    selection_pool=selection)
    read = []
    measure = search.evaluate_rows
    search.evaluate_rows = lambda levels, teacher, train: read.append(teacher.input_ids) or measure(
        levels, teacher, train)
    search.uniform_slopes()
    start_rows = {tuple(row) for rows in read for row in rows.tolist()}
    assert start_rows and start_rows <= {tuple(row) for row in real[2:].tolist()}  # real text past the fixed rows
    read.clear()
    search.run()
    selection_reads = [rows for rows in read if rows.shape[0] == 4]  # the stage's 64 tokens; fixed rows are 2
    assert selection_reads and all(any(torch.equal(row, made_row) for made_row in made[:3]) or
                                   any(torch.equal(row, own) for own in real[2:]) for rows in selection_reads
                                   for row in rows)
    assert any(torch.equal(row, made_row) for rows in selection_reads for row in rows for made_row in made[:3])
    assert all(torch.equal(rows, real[:2]) for rows in read if rows.shape[0] == 2)  # the trajectory: real text
