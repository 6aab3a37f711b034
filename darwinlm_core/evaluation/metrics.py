"""Held-out perplexity: token-level, over non-overlapping fixed-length windows; standard errors, and whether a
difference between two estimates is within noise."""

import math
from collections.abc import Callable
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over every predicted token of `windows`, (n_windows, seq_len) int64.

    Each window is scored on its own (no context carried across windows), so the figure depends only on the
    windows, not on the batch size. perplexity_with_se gives its standard error too.
    """
    return perplexity_with_se(model, windows, batch_size, progress, desc)[0]


@torch.no_grad()
def perplexity_with_se(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                       desc: str = "ppl", on_logits: "LogitsCallback | None" = None) -> tuple[float, float]:
    """(perplexity, its standard error) over `windows`, (n_windows, seq_len) int64.

    The windows are the independent samples: each one's mean next-token NLL is a draw, the perplexity is
    exp(mean of those draws) (every window predicts seq_len − 1 tokens, so this is exp of the token mean), and
    its standard error is the delta method's ppl · SE(mean NLL). Tokens within a window are not independent,
    so a per-token SE would be too small. NaN with a single window (no spread to measure).
    """
    # The SE treats windows as independent draws. Adjacent windows of one document share its topic and style
    # and are correlated, so contiguous windows would make the SE too small; the pipeline's windows are spread
    # evenly over the whole held-out text (darwinlm.core.data.windows), far apart, which is much closer to
    # independent sampling (still not exactly: windows of one long document remain related).
    nll = window_nlls(model, windows, batch_size, progress, desc, on_logits)
    ppl = math.exp(nll.mean().item())
    return ppl, ppl * standard_error(nll.tolist())


LogitsCallback = Callable[[slice, torch.Tensor], None]  # (rows of the batch, its logits (rows, seq_len, vocab))


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                desc: str = "ppl", on_logits: LogitsCallback | None = None) -> torch.Tensor:
    """Mean next-token NLL of each window of `windows` (n_windows, seq_len) int64 → (n_windows,) float64.
    `on_logits(rows, logits)` sees each batch's logits too: a KL or a teacher on the same windows then needs
    no forward pass of its own."""
    device = next(model.parameters()).device
    means = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[start : start + batch_size].to(device)
        full = model(ids, use_cache=False).logits
        if on_logits is not None:
            on_logits(slice(start, start + ids.shape[0]), full)
        logits = full[:, :-1].float()
        labels = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        means.append(nll.view(labels.shape).double().mean(dim=1).cpu())
    return torch.cat(means)


def standard_error(samples: Sequence[float]) -> float:
    """Standard error of the mean of independent samples: sample standard deviation (n − 1) / √n; NaN if n < 2."""
    n = len(samples)
    if n < 2:
        return math.nan
    mean = sum(samples) / n
    return math.sqrt(sum((x - mean) ** 2 for x in samples) / (n - 1) / n)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent examples: √(p(1 − p)/n); NaN if n < 1."""
    return math.sqrt(p * (1 - p) / n) if n >= 1 else math.nan


def mean_se(ses: Sequence[float]) -> float:
    """Standard error of the mean of k independent estimates with standard errors `ses`: √(Σ se²) / k."""
    return math.sqrt(sum(se * se for se in ses)) / len(ses)


def within_noise(a: float, se_a: float, b: float, se_b: float, z: float = 2.0) -> bool:
    """Whether two independent estimates differ by no more than z standard errors of their difference:
    |a − b| ≤ z·√(se_a² + se_b²). What a table uses to mark a difference as noise (z = 2: about 95%)."""
    return abs(a - b) <= z * math.sqrt(se_a * se_a + se_b * se_b)


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


# A figure's standard error sits beside it under the figure's key plus this suffix: ppl_sotu_se, acc_<task>_se.
SE_SUFFIX = "_se"


def is_se_key(key: str) -> bool:
    """Whether `key` names a standard error (`<figure>_se`) rather than a figure."""
    return key.endswith(SE_SUFFIX)


def with_se(row: dict, key: str, spec: str = ".2f") -> str:
    """row[key] formatted by `spec`, followed by ` ± <its standard error>` when the row holds a finite one."""
    se = row.get(key + SE_SUFFIX)
    value = format(row[key], spec)
    return value if se is None or not math.isfinite(se) else f"{value} ± {format(se, spec)}"
