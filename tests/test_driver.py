"""The generic driver must reproduce each family's own forward pass, with and without GQA."""

import pytest
import torch

from darwinlm.core.model.arch import arch_for, supported_model_types
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.errors import DarwinLMError
from tests.support.tiny_models import TINY_FAMILIES, random_token_rows, tiny_model

FAMILIES = list(TINY_FAMILIES)  # llama3: a Llama with Llama 3.x rope scaling and tied embeddings


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_driver_reproduces_model_forward(family, gqa, attn):
    model = tiny_model(family, gqa=gqa, attn_implementation=attn)
    rows = random_token_rows(model.config.vocab_size, rows=5, seq_len=24)
    with torch.no_grad():
        expected = model(rows).logits
    # batch_size 2 leaves a ragged last batch: the recorded block arguments must broadcast over any batch.
    driven = BlockDriver(model, rows, batch_size=2).logits()
    assert (driven - expected).abs().max().item() <= 1e-5


def test_driver_holds_one_activation_buffer_and_advances_in_order():
    model = tiny_model("llama")
    rows = random_token_rows(model.config.vocab_size, rows=3, seq_len=8)
    driver = BlockDriver(model, rows, batch_size=2)
    buffer = driver.hidden
    seen = []
    handles = [
        block.register_forward_hook(lambda _m, _a, _o, i=i: seen.append(i)) for i, block in enumerate(driver.blocks)
    ]
    driver.run_to_end()
    for handle in handles:
        handle.remove()
    assert driver.hidden is buffer  # outputs overwrite the inputs rather than piling up per block
    assert seen == [0, 0, 1, 1, 2, 2]  # two batches per block, blocks in order
    with pytest.raises(IndexError):
        driver.advance()


def test_driver_block_inputs_match_hidden_states():
    model = tiny_model("qwen2")
    rows = random_token_rows(model.config.vocab_size, rows=2, seq_len=10)
    with torch.no_grad():
        states = model(rows, output_hidden_states=True).hidden_states
    driver = BlockDriver(model, rows)
    for index in range(driver.num_blocks):
        assert torch.allclose(driver.hidden, states[index], atol=1e-5)
        driver.advance()


def test_llama3_rope_scaling_shapes_what_the_driver_runs():
    """The tiny Llama 3.x really uses its rope scaling: the same weights with plain rope compute another function."""
    model = tiny_model("llama3")
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.tie_word_embeddings
    plain = tiny_model("llama3", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    rows = random_token_rows(model.config.vocab_size, rows=2, seq_len=48)
    driven, plain_driven = BlockDriver(model, rows).logits(), BlockDriver(plain, rows).logits()
    assert (driven - plain_driven).abs().max().item() > 1e-3


def test_registry_covers_required_families_and_rejects_others():
    assert {"llama", "qwen2", "mistral", "gemma3_text", "qwen3", "phi3"} <= set(supported_model_types())
    config = tiny_model("llama").config
    config.model_type = "gpt2"
    with pytest.raises(DarwinLMError, match="unsupported architecture 'gpt2'") as error:
        arch_for(config)
    message = str(error.value)
    assert "\n" not in message  # one line the CLI prints as is
    assert all(family in message for family in ("llama", "qwen2", "mistral", "gemma3_text", "qwen3", "phi3"))
