"""Fitness: KL(dense ‖ pruned) per token, against a compact teacher computed once.

The teacher keeps, per token, its top-k log-probabilities and their ids (float32 + int32: k·8 bytes instead
of vocab·4), and the KL is taken over the k kept tokens plus one bucket holding the remaining mass:
    KL ≈ Σ_{i∈top-k} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)
This never exceeds the exact KL (coarsening a distribution pair can only lose divergence) and is exact when
the tail carries no mass; with k in the hundreds it is within 1e-3 of exact on real models.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors



@dataclass(frozen=True)
class CompactTeacher:
    """Top-k teacher log-probs for rows of token ids: (n_rows, seq_len, k) values and ids."""

    input_ids: torch.Tensor  # (n_rows, seq_len) int64
    top_logprobs: torch.Tensor  # (n_rows, seq_len, k) float32
    top_ids: torch.Tensor  # (n_rows, seq_len, k) int32

    def rows(self, index: torch.Tensor) -> "CompactTeacher":
        return CompactTeacher(self.input_ids[index], self.top_logprobs[index], self.top_ids[index])

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to_bytes(self) -> bytes:
        """safetensors bytes, so workers load the teacher from the artifact store instead of recomputing it."""
        return save_safetensors({"input_ids": self.input_ids.contiguous(), "top_logprobs": self.top_logprobs.contiguous(),
                                 "top_ids": self.top_ids.contiguous()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "CompactTeacher":
        tensors = load_safetensors(data)
        return cls(tensors["input_ids"], tensors["top_logprobs"], tensors["top_ids"])


@torch.no_grad()
def compute_teacher(model, input_ids: torch.Tensor, top_k: int, batch_size: int = 4) -> CompactTeacher:
    """Run the (dense) model once over `input_ids` (n_rows, seq_len) and keep its top-k log-probs per token."""
    values, ids = [], []
    device = next(model.parameters()).device
    for start in range(0, input_ids.shape[0], batch_size):
        top_logprobs, top_ids = teacher_top_k(model(input_ids[start : start + batch_size].to(device),
                                                    use_cache=False).logits, top_k)
        values.append(top_logprobs)
        ids.append(top_ids)
    return CompactTeacher(input_ids, torch.cat(values), torch.cat(ids))


def teacher_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's compact teacher: (top-k log-probs float32, their ids int32), (rows, seq_len, k) each, on the
    CPU (the pool stays in host memory; batches go to the device as needed)."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    return top.values.cpu(), top.indices.to(torch.int32).cpu()


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable near 0 (remaining mass of a nearly complete top-k)."""
    return torch.log(-torch.expm1(log_mass.clamp(max=-1e-12)))


def kl_per_position(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor
                    ) -> torch.Tensor:
    """Bucketed KL(teacher ‖ student) at every position. logits (..., vocab); teacher tensors (..., k) → (...)."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    student_top = student.gather(-1, teacher_ids.long())
    kl_top = (teacher_logprobs.exp() * (teacher_logprobs - student_top)).sum(-1)
    teacher_rest = _log1mexp(torch.logsumexp(teacher_logprobs, dim=-1))
    student_rest = _log1mexp(torch.logsumexp(student_top, dim=-1))
    return kl_top + teacher_rest.exp() * (teacher_rest - student_rest)


def kl_sum(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of bucketed KL(teacher ‖ student). logits (..., vocab); teacher tensors (..., k)."""
    return kl_per_position(student_logits, teacher_logprobs, teacher_ids).sum()


@torch.no_grad()
def kl_per_row(model, teacher: CompactTeacher, batch_size: int = 4,
               logits_of: Callable[[slice], torch.Tensor] | None = None) -> list[float]:
    """Mean bucketed KL(dense ‖ model) per token of each of the teacher's rows: a comparison of two models on
    the same rows rests on their paired per-row differences. `logits_of(rows)`: the logits of one batch of the
    teacher's rows, if not from the model's forward pass (a caller that has the last block's outputs)."""
    per_row = []
    device = next(model.parameters()).device
    for start in range(0, teacher.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        if logits_of is None:
            logits = model(teacher.input_ids[rows].to(device), use_cache=False).logits
        else:
            logits = logits_of(rows)
        kl = kl_per_position(logits, teacher.top_logprobs[rows].to(device), teacher.top_ids[rows].to(device))
        per_row.extend(kl.mean(-1).tolist())
    return per_row


def kl_per_token(model, teacher: CompactTeacher, batch_size: int = 4) -> float:
    """Mean bucketed KL(dense ‖ model) over every token of the teacher's rows (which share one length)."""
    per_row = kl_per_row(model, teacher, batch_size)
    return sum(per_row) / len(per_row)


def exact_kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Full-vocabulary KL(teacher ‖ student) per token, for checking the compact form. (..., vocab) each."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())
