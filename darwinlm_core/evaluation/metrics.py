"""Held-out perplexity: token-level, over non-overlapping fixed-length windows."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over every predicted token of `windows`, (n_windows, seq_len) int64.

    Each window is scored on its own (no context carried across windows), so the figure depends only on the
    windows, not on the batch size.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        total_tokens += labels.numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def prefill_tokens_per_second(models: list, ids: torch.Tensor, repeats: int = 3) -> list[float]:
    """Forward throughput of each model on the same rows (n_rows, seq_len), measurements interleaved across
    models and the median taken, so load on a shared machine hits every model alike."""
    inputs = [ids.to(next(model.parameters()).device) for model in models]
    measures = {index: (lambda model=model, rows=rows: timed_seconds(lambda: model(rows, use_cache=False), rows.device))
                for index, (model, rows) in enumerate(zip(models, inputs))}
    seconds = interleaved_medians(measures, repeats)
    return [ids.numel() / seconds[index] for index in range(len(models))]


def greedy_continuation(model, tokenizer, prompt_ids: torch.Tensor, new_tokens: int = 32) -> str:
    """The model's greedy continuation of `prompt_ids` (1-D int64) as text: what a user reads before any table."""
    device = next(model.parameters()).device
    output = model.generate(prompt_ids[None].to(device), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, prompt_ids.numel():], skip_special_tokens=True)
