"""Random tiny models of each registered family, built from configs, for tests and quick experiments.

Nothing is downloaded: a config plus a seed fully determine the weights, so a test can rebuild the same model.
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.database.assembly import LiveAssembly

# DatabaseConfig options for the ladders before hardware alignment: MLP levels at even steps of any width, query
# heads removed one at a time (uneven KV groups). Tests of what must still work for such databases use them.
PLAIN_LADDERS = dict(mlp_alignment=1, even_kv_groups=False)

# Small enough to run a forward in milliseconds, large enough to have several heads per KV group.
_TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


# Llama 3.x: model_type "llama" with rope_type "llama3". The original context (64) is short enough that the
# tiny head_dim's frequencies fall in all three bands (kept, interpolated, scaled by `factor`).
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)

# Per tiny family: its model_type and config fields beyond the shared shape.
_FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    "gemma3_text": ("gemma3_text", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", dict(pad_token_id=0, eos_token_id=1)),  # Phi-3's default ids (32000) lie outside the vocabulary
    "llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),  # as Llama 3.2 1B/3B
}
TINY_FAMILIES = tuple(_FAMILIES)


def tiny_config(family: str, *, gqa: bool = True, **overrides):
    """A config of a tiny family (TINY_FAMILIES; "llama3" is a Llama with Llama 3.x rope scaling and tied
    embeddings): 4 query heads over 2 KV heads (gqa) or 4 (plain MHA). Gemma 3 alternates sliding-window
    (8 tokens) and full attention layers, as it does at scale."""
    model_type, extra = _FAMILIES[family]
    shape = dict(_TINY_SHAPE, num_key_value_heads=2 if gqa else 4, **extra)
    shape.update(overrides)
    if family == "gemma3_text" and "layer_types" not in overrides:
        shape["layer_types"] = ["full_attention" if i % 2 else "sliding_attention"
                                for i in range(shape["num_hidden_layers"])]
        shape.setdefault("sliding_window", 8)
    return AutoConfig.for_model(model_type, **shape)


def tiny_model(
    family: str, *, gqa: bool = True, seed: int = 0, attn_implementation: str = "sdpa", **overrides
) -> PreTrainedModel:
    """A random float32 model of `family` in eval mode; same arguments → same weights."""
    config = tiny_config(family, gqa=gqa, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF init draws small weights (std 0.02) that make every block nearly the identity; larger ones make
    # tests sensitive to mistakes in pruning and driving.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # per-head q/k norms that are not all ones
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def random_token_rows(vocab_size: int, rows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(rows, seq_len) int64 token ids drawn uniformly, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq_len), generator=generator)


TINY_TOKENIZER_CHARS = [chr(code) for code in range(32, 127)] + ["\n"]


def tiny_tokenizer():
    """A real fast tokenizer, one token per printable ASCII character (ids 2..; 0 unk, 1 eos), built in memory.

    Its 99 ids fit the tiny models' vocabulary of 128, so tiny model + tiny tokenizer make a loadable pair.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{char: index + 2 for index, char in enumerate(TINY_TOKENIZER_CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


TINY_BPE_VOCAB = 300  # 256 byte symbols + 2 special tokens + 42 merges
TINY_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}")


def tiny_bpe_tokenizer(text: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style, which llama.cpp also runs) trained in memory on `text`:
    ids 0 `<|endoftext|>`, 1 `<|im_end|>`, 256 byte symbols, merges up to TINY_BPE_VOCAB ids, a chat template.

    Models built with `vocab_size=TINY_BPE_VOCAB` (or more) pair with it, e.g. for GGUF export tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = text or ("Four score and seven years ago our fathers brought forth on this continent a new nation, "
                    "conceived in liberty, and dedicated to the proposition that all men are created equal. ") * 4
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_BPE_VOCAB, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def pruned_tiny(family: str, tmp_path: Path, model=None):
    """A tiny model (of `family`, or `model`) with layer 0's attention removed, layer 1's query heads uneven over
    KV heads (3 of 4 heads kept on 2 KV heads) and a partly pruned MLP, plus its database and assembly. Built
    with the plain ladders (PLAIN_LADDERS) so that uneven groups and unaligned widths, which exports must still
    express, occur."""
    model = model or tiny_model(family)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    rows = random_token_rows(model.config.vocab_size, rows=16, seq_len=32)
    database = build_database(model, rows, str(tmp_path / "db"), calibration_digest="tiny",
                              config=DatabaseConfig(storage_dtype="float32", **PLAIN_LADDERS))
    assembly = LiveAssembly(model, database)
    levels = {(0, "attn"): database.num_levels(0, "attn") - 1, (1, "attn"): 1, (1, "mlp"): 5, (2, "mlp"): 3}
    assembly.apply(levels)
    return model, database, assembly, levels
