"""Text the dense model writes itself, mixed into the rows the search selects on.

Why: the search scores candidates by KL to the dense model on its teacher pool. A pool of the calibration text
alone (State of the Union by default, or the user's --text) tunes the genome to that one genre; out of domain,
the post-trained model it shipped recovered no better than the informed start (issue 39). Text sampled from the
dense model spans the genres it was trained on and needs nothing from the user: selecting on a pool half of it
gave post-trained models 0.69-0.92x the informed start's perplexity on three texts unlike the calibration text,
over 3 seeds (experiments/2026-12-05-self-generated-selection). Only selection reads it: the fixed rows and the
informed start's KL slopes stay on real text, since slopes measured on a small model's own text priced
attention as nearly free and misled the start on every text.
"""

import torch
from tqdm.auto import tqdm

from darwinlm.core.errors import DarwinLMError

# Sampling as the model's own distribution, trimmed of its least likely tail (the 5% of mass that makes
# unbounded sampling drift into noise within a few hundred tokens).
TEMPERATURE = 1.0
TOP_P = 0.95


def document_start_token(tokenizer) -> int:
    """The token a fresh pretraining document starts after, so that sampling from it alone gives documents of
    any genre: the BOS the tokenizer puts before text (Llama, Gemma), else the `<|endoftext|>` separator that
    GPT-2-style vocabularies (SmolLM, Qwen) join documents with, else EOS. Not SmolLM2's BOS, `<|im_start|>`,
    which starts a chat turn, and which its tokenizer does not put before text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return int(bos)
    separator = tokenizer.get_vocab().get("<|endoftext|>")
    if separator is not None:
        return int(separator)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DarwinLMError("the tokenizer has no BOS it puts before text, no <|endoftext|> and no EOS to start "
                            "generated rows from", "set search.generated_share: 0, or give the tokenizer an EOS")
    return int(tokenizer.eos_token_id)


class _TokenProgress:
    """A logits processor that ticks a progress bar once per generated position and leaves the scores alone (so
    the samples, and the random numbers they draw, are those of a plain generate call)."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


@torch.no_grad()
def sample_rows(model, tokenizer, count: int, seq_len: int, seed: int, progress: bool = False) -> torch.Tensor:
    """`count` rows of `seq_len` tokens sampled from `model` (TEMPERATURE, TOP_P), each the document start token
    and seq_len − 1 generated tokens, from torch's generator seeded with `seed` (the caller's global RNG state
    is left as it was). Returns int64 (count, seq_len) on the CPU. Minutes for a 135M model on 2 CPU cores."""
    from transformers import LogitsProcessorList  # here: the CLI sets the offline defaults before transformers loads

    if count < 1 or seq_len < 2:
        raise DarwinLMError(f"cannot sample {count} rows of {seq_len} tokens", "ask for ≥ 1 row of ≥ 2 tokens")
    device = next(model.parameters()).device
    start = torch.full((count, 1), document_start_token(tokenizer), device=device)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start[0, 0].item()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            tqdm(total=seq_len - 1, desc=f"sampling {count} rows", unit="pos", disable=not progress) as bar:
        torch.manual_seed(seed)
        rows = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=TEMPERATURE,
                              top_p=TOP_P, top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                              pad_token_id=pad, logits_processor=LogitsProcessorList([_TokenProgress(bar)]))
    return rows.cpu()


def generated_count(share: float, selectable_rows: int) -> int:
    """How many of `selectable_rows` selection rows are generated at `share`."""
    return round(share * selectable_rows)


def selection_rows(pool_rows: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """`pool_rows` (n, seq_len) with the `generated` rows (g ≤ n of them) spread evenly among them: row i is
    generated when ⌊(i+1)·g/n⌋ > ⌊i·g/n⌋ (every other row at g = n/2), the rest are the pool's first n − g rows,
    in order. n rows in all, so the stages' row counts, and their draws, are those of the plain pool."""
    n, g = pool_rows.shape[0], generated.shape[0]
    if g > n or generated.shape[1:] != pool_rows.shape[1:]:
        raise DarwinLMError(f"{g} generated rows of shape {tuple(generated.shape[1:])} cannot replace rows of a "
                            f"pool of {n} rows of shape {tuple(pool_rows.shape[1:])}",
                            "generate at most as many rows as the pool has, of its row length")
    is_generated = [(i + 1) * g // n > i * g // n for i in range(n)]
    own, made = iter(pool_rows), iter(generated)
    return torch.stack([next(made) if flag else next(own) for flag in is_generated])
