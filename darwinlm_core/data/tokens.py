"""Token blocks: documents joined by EOS and cut into non-overlapping rows of a fixed length."""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from darwinlm.core.data.sources import Document
from darwinlm.core.errors import DarwinLMError

# Tokenizer calls take lists of about this many characters: big enough for the Rust tokenizer to parallelise,
# small enough that a multi-MB corpus never becomes one giant call (and one giant list of Python ints).
TOKENIZE_CHUNK_CHARS = 1 << 20
_BEFORE_WORD = re.compile(r"\s(?=\S)")  # where a long document may be cut: see _cut_point


def tokenize_blocks(
    documents: Sequence[Document], tokenizer, seq_len: int, max_blocks: int | None = None
) -> torch.LongTensor:
    """Token blocks of the documents, in order, joined by EOS and cut into non-overlapping rows.

    `tokenizer`: a Hugging Face tokenizer, or any object with `eos_token_id` and
    `__call__(list[str], add_special_tokens=False, **kwargs) -> {"input_ids": list[list[int]]}`.
    Returns int64 tensor (n_blocks, seq_len) on CPU; the remainder after the last full block is dropped, and
    `max_blocks` keeps the first blocks (tokenizing stops once it has enough text).
    """
    if seq_len < 1 or (max_blocks is not None and max_blocks < 1):
        raise DarwinLMError(f"seq_len {seq_len} and max_blocks {max_blocks} must be positive", "pass positive values")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DarwinLMError("the tokenizer has no eos_token_id to join documents with", "set tokenizer.eos_token_id")
    wanted = None if max_blocks is None else max_blocks * seq_len
    stream = _token_stream(documents, tokenizer, int(eos), wanted)
    n_blocks = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    if n_blocks == 0:
        raise DarwinLMError(
            f"the text gives {len(stream)} tokens, but one block of seq_len {seq_len} needs {seq_len}",
            "give more text or a smaller seq_len",
        )
    return torch.from_numpy(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)


def token_stream(documents: Sequence[Document], tokenizer) -> torch.LongTensor:
    """Every token of the documents, in order, joined by EOS → int64 (n_tokens,) on CPU: the whole text, for
    windows spread over all of it (darwinlm.core.data.windows). `tokenizer` as for tokenize_blocks."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DarwinLMError("the tokenizer has no eos_token_id to join documents with", "set tokenizer.eos_token_id")
    return torch.from_numpy(_token_stream(documents, tokenizer, int(eos), None))


def _token_stream(documents: Sequence[Document], tokenizer, eos: int, wanted: int | None) -> np.ndarray:
    """int64 (n_tokens,): every document's tokens with `eos` between documents; stops early past `wanted`."""
    chunks: list[np.ndarray] = []
    total = 0
    for batch in _batches(_pieces(documents, TOKENIZE_CHUNK_CHARS), TOKENIZE_CHUNK_CHARS):
        flat: list[int] = []
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (starts_document, _), ids in zip(batch, encoded):
            if starts_document and (total or flat):
                flat.append(eos)
            flat.extend(ids)
        chunks.append(np.asarray(flat, dtype=np.int64))
        total += len(flat)
        if wanted is not None and total >= wanted:
            break
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _pieces(documents: Sequence[Document], limit: int) -> Iterator[tuple[bool, str]]:
    """(starts_document, text) pieces of at most about `limit` characters, cut only inside long documents."""
    for doc in documents:
        start = 0
        while start < len(doc.text):
            end = _cut_point(doc.text, start, limit)
            yield start == 0, doc.text[start:end]
            start = end


def _cut_point(text: str, start: int, limit: int) -> int:
    """End of the piece starting at `start`: before the last whitespace character that precedes a word.

    Byte-level BPE pre-tokenizers (GPT-2, Llama 3, SmolLM2: `\\s+(?!\\S)`) split a whitespace run just there,
    giving its last character to the next word, so the pieces' tokens match those of the whole text. Other
    tokenizers may differ by a token at a cut; only documents longer than `limit` characters are cut at all.
    """
    if len(text) - start <= limit:
        return len(text)
    last = None
    for last in _BEFORE_WORD.finditer(text, start + 1, start + limit + 1):
        pass
    return last.start() if last is not None else start + limit


def _batches(pieces: Iterable[tuple[bool, str]], limit: int) -> Iterator[list[tuple[bool, str]]]:
    """Group pieces into lists of about `limit` characters: one tokenizer call each."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def sample_blocks(blocks: torch.LongTensor, n: int, generator: torch.Generator) -> torch.LongTensor:
    """n distinct rows of `blocks` (n_blocks, seq_len), in the generator's random order → (n, seq_len)."""
    available = blocks.shape[0]
    if not 0 <= n <= available:
        raise DarwinLMError(
            f"asked for {n} blocks but {available} are available",
            "ask for fewer blocks, give more text, or use a smaller seq_len",
        )
    order = torch.randperm(available, generator=generator, device=generator.device)[:n]
    return blocks[order.to(blocks.device)]
