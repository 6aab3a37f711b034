"""Finetuning a physically shrunk candidate: the short one inside selection and the longer post-training.

Only the block linears train (embeddings, head and norms stay as the dense model has them, so candidates
differ only in what the database and their own finetune gave them). Because the model is shrunk, removed
heads and channels have no weights to revive: pruned structure stays pruned by construction. A fresh AdamW
per call holds only this candidate's optimizer state.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from darwinlm.core.model.arch import arch_for
from darwinlm.core.search.fitness import CompactTeacher, kl_sum


@dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 1e-5
    batch_size: int = 1
    weight_decay: float = 0.0
    warmup_fraction: float = 0.0  # post-training uses warmup + cosine decay; selection uses a constant lr
    cosine: bool = False
    distill_weight: float = 0.0  # weight of KL to the teacher in the loss (needs teacher rows)
    max_grad_norm: float = 1.0


def trainable_block_parameters(model) -> list[torch.nn.Parameter]:
    spec = arch_for(model)
    return [p for block in spec.block_list(model) for name, p in block.named_parameters() if "norm" not in name]


def _learning_rate(config: FinetuneConfig, step: int, total: int) -> float:
    warmup = int(config.warmup_fraction * total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if not config.cosine:
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def finetune(model, input_ids: torch.Tensor, config: FinetuneConfig, teacher: CompactTeacher | None = None,
             progress: bool = False) -> list[float]:
    """Train the block linears of `model` on rows (n_rows, seq_len) int64, one pass; returns per-step losses.

    Loss: next-token cross-entropy, plus `distill_weight` × KL(teacher ‖ model) when a teacher for the same
    rows is given. The model is left in eval mode.
    """
    parameters = trainable_block_parameters(model)
    frozen = [p for p in model.parameters() if all(p is not q for q in parameters)]
    saved_flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(input_ids.shape[0] / config.batch_size)
    device = next(model.parameters()).device
    losses = []
    model.train()
    try:
        for step in tqdm(range(steps), desc="finetune", disable=not progress, unit="step"):
            rows = slice(step * config.batch_size, (step + 1) * config.batch_size)
            batch = input_ids[rows].to(device)
            logits = model(batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            if teacher is not None and config.distill_weight > 0:
                kl = kl_sum(logits, teacher.top_logprobs[rows].to(device), teacher.top_ids[rows].to(device)) / batch.numel()
                loss = (1 - config.distill_weight) * loss + config.distill_weight * kl
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for p, flag in zip(frozen, saved_flags):
            p.requires_grad_(flag)
    return losses
