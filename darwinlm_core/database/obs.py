"""Greedy structured OBS (ZipLM-style): remove whole input-column groups of a linear layer one at a time.

A unit is a group of input columns of W (d_out × d_in): one MLP channel of down_proj, or one attention head
(head_dim columns) or one KV group of o_proj. Each step removes the unit J whose removal raises the
layer-output error ‖WX − ŴX‖² least, and moves the remaining weights to compensate, in closed form:
    B = Hinv[J, J],  score_J = tr(W_J B⁻¹ W_Jᵀ),  W −= W_J B⁻¹ Hinv[J, :],  Hinv −= Hinv[:, J] B⁻¹ Hinv[J, :]
One greedy pass yields every level, because removal sets are nested.

Optionally (`params_freed`) the greedy ranks units by score per parameter freed instead of by score: with GQA
query heads, a KV group's last head also frees the group's k/v, so completing a group can be the cheaper way to
reach a parameter budget, which is what the levels are chosen against. Optionally (`eligible`) each step picks
only among the units a rule allows at that point: with even KV groups, the heads of the groups that have lost
the fewest, so that the levels taken after each round of one head per group leave the groups even.

Two implementations of the same math: `greedy_groups` for a handful of multi-column units (heads), and
`greedy_columns` for thousands of single columns (channels), which batches the rank-1 downdates
(GPTQ's lazy-batch trick) because a full d_in² update per removed channel costs ~100 s on SmolLM2.

Each step's score is exactly what the removal adds to the *damped* error ‖ΔW‖²_{H+D}, so the greedy also yields
every level's damped error as a running sum; `prune_ladder` turns that into the undamped relative error the
database stores, without a quadratic form per level (a fifth of the OBS time of an MLP layer).
"""

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from darwinlm.core.database.structure import unit_columns


@dataclass(frozen=True)
class PrunedWeights:
    """One level: the units still present (ascending) and W's columns for them after OBS updates."""

    units_removed: int
    kept_units: torch.Tensor  # (n_kept,) int64, ascending
    weight: torch.Tensor  # (d_out, n_kept * unit_size) float32


def dampen(hessian: torch.Tensor, relative_damping: float) -> torch.Tensor:
    """H + λ·mean(diag H)·I, with dead inputs (zero diagonal) made harmless. (d, d) float32 → new tensor."""
    damped = hessian.clone()
    diagonal = damped.diagonal()
    diagonal[diagonal == 0] = 1.0  # an input that was always zero: any weight update there is free
    diagonal += relative_damping * diagonal.mean()
    return damped


def inverse_hessian(hessian: torch.Tensor, relative_damping: float) -> torch.Tensor:
    """(H + λ mean(diag) I)⁻¹ through Cholesky, in float64 for accuracy, returned as float32."""
    damped = dampen(hessian.double(), relative_damping)
    return torch.cholesky_inverse(torch.linalg.cholesky(damped)).float()


ParamsFreed = Callable[[torch.Tensor], torch.Tensor]  # (n_units,) bool removed → (n_units,) params each unit frees
Eligible = Callable[[torch.Tensor], torch.Tensor]  # (n_units,) bool removed → (n_units,) bool: may go next


def greedy_prune(
    weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, snapshots: list[int],
    params_freed: ParamsFreed | None = None, eligible: Eligible | None = None,
) -> list[PrunedWeights]:
    """Greedily remove units of `unit_size` columns; return W at each count in `snapshots` (see `greedy_path`)."""
    return greedy_path(weight, hinv, unit_size, snapshots, params_freed, eligible)[0]


def greedy_path(
    weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, snapshots: list[int],
    params_freed: ParamsFreed | None = None, eligible: Eligible | None = None,
) -> tuple[list[PrunedWeights], list[float]]:
    """Greedily remove units of `unit_size` columns; return (W at each count in `snapshots` (ascending), the damped
    error ‖ΔW‖²_{hinv⁻¹} at each of them, summed in float64 from the steps' scores).

    weight: (d_out, d_in) float32; hinv: (d_in, d_in) float32 inverse damped Hessian; both left unchanged.
    A snapshot equal to the total number of units is returned with no kept units, an empty weight and a NaN
    damped error (the steps to it are skipped: its error is known without them).
    params_freed: if given, each step removes the unit of least score ÷ params_freed(removed)[unit] (see
    ModuleShape.params_freed); None ranks by score alone.
    eligible: if given, each step picks only among the units it marks (see ModuleShape.heads_of_groups_behind).
    """
    n_units = weight.shape[1] // unit_size
    if weight.shape[1] % unit_size or list(snapshots) != sorted(snapshots) or snapshots[-1] > n_units:
        raise ValueError(f"bad unit_size {unit_size} or snapshots {snapshots} for {weight.shape[1]} columns")
    with _single_thread():
        weight, hinv = weight.float().clone(), hinv.float().clone()
        if unit_size == 1 and params_freed is None and eligible is None:
            return greedy_columns(weight, hinv, unit_size, snapshots)
        return greedy_groups(weight, hinv, unit_size, snapshots, params_freed, eligible)


@contextmanager
def _single_thread():
    """The greedy loop is thousands of small sequential ops: thread hand-offs cost more than they give
    (3× slower with 2 threads on a loaded 2-core machine), so it runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _only_everything_left(snapshots: list[int], taken: int, n_units: int) -> bool:
    """Whether the one snapshot still wanted is "every unit removed": it has no weights, so the greedy steps
    that would lead there (a tenth of them with ten levels) are skipped."""
    return snapshots[taken:] == [n_units] and n_units > 0


def _damped_or_skipped(damped: list[float], results: list[PrunedWeights]) -> list[float]:
    """The damped errors, NaN for a last snapshot reached without its steps (everything removed)."""
    return damped + [math.nan] * (len(results) - len(damped))


def _everything_removed(weight: torch.Tensor, n_units: int) -> PrunedWeights:
    """The snapshot with no unit kept: the same tensors `_snapshot` returns once every unit is removed."""
    return PrunedWeights(n_units, torch.zeros(0, dtype=torch.int64), weight[:, :0].cpu())


def _snapshot(weight: torch.Tensor, removed: torch.Tensor, unit_size: int) -> PrunedWeights:
    kept = (~removed).nonzero().flatten()
    columns = unit_columns(kept, unit_size)
    return PrunedWeights(int(removed.sum()), kept.cpu(), weight[:, columns].cpu())  # snapshots live on the CPU


def greedy_groups(weight, hinv, unit_size, snapshots, params_freed: ParamsFreed | None = None,
                  eligible: Eligible | None = None) -> tuple[list[PrunedWeights], list[float]]:
    n_units = weight.shape[1] // unit_size
    removed = torch.zeros(n_units, dtype=torch.bool, device=weight.device)
    results, damped_at, damped = [], [], 0.0
    for count in range(n_units + 1):
        while snapshots[len(results) :] and snapshots[len(results)] == count:
            results.append(_snapshot(weight, removed, unit_size))
            damped_at.append(damped)
        if len(results) == len(snapshots):
            break
        if _only_everything_left(snapshots, len(results), n_units):
            results.append(_everything_removed(weight, n_units))
            break
        best, best_score, best_inverse, best_raw = -1, float("inf"), None, 0.0
        freed = None if params_freed is None else params_freed(removed.cpu()).tolist()
        candidates = ~removed if eligible is None else ~removed & eligible(removed.cpu()).to(removed.device)
        for unit in candidates.nonzero().flatten().tolist():
            cols = slice(unit * unit_size, (unit + 1) * unit_size)
            block_inverse = torch.linalg.inv(hinv[cols, cols])
            raw = score = ((weight[:, cols] @ block_inverse) * weight[:, cols]).sum().item()
            if freed is not None:
                score /= freed[unit]  # error per parameter: the levels are spent against a parameter budget
            if score < best_score:
                best, best_score, best_inverse, best_raw = unit, score, block_inverse, raw
        cols = slice(best * unit_size, (best + 1) * unit_size)
        weight -= weight[:, cols] @ best_inverse @ hinv[cols, :]
        hinv -= hinv[:, cols] @ best_inverse @ hinv[cols, :]
        removed[best] = True
        damped += best_raw  # the removal's exact damped-error increase
    return results, _damped_or_skipped(damped_at, results)


def greedy_columns(weight, hinv, _unit_size, snapshots, batch: int = 128
                   ) -> tuple[list[PrunedWeights], list[float]]:
    """Single-column units with lazily applied downdates.

    Between flushes, the true matrices are  W = weight − A·B  and  Hinv = hinv − UᵀU  with k pending rank-1
    terms; per step we only need one row of Hinv and one column of W, plus running column norms of W and
    the diagonal of Hinv, all of which are cheap to update. Every `batch` steps the terms are applied with two
    matrix products and the running quantities are recomputed exactly, which also bounds rounding drift.
    """
    d_out, d_in = weight.shape
    on = dict(device=weight.device)
    removed = torch.zeros(d_in, dtype=torch.bool, **on)
    a_terms, b_terms, u_terms = torch.zeros(d_out, batch, **on), torch.zeros(batch, d_in, **on), torch.zeros(batch, d_in, **on)
    pending = 0
    # The flushes' products go to buffers allocated once: a fresh d_in² tensor per flush is served by new pages
    # from the OS, and faulting them in cost a fifth of the greedy (0.77 → 0.61 s on a SmolLM2 MLP layer).
    # Same products, same bits.
    weight_update, hinv_update = torch.empty_like(weight), torch.empty_like(hinv)

    def flush():
        nonlocal pending
        weight.sub_(torch.mm(a_terms[:, :pending], b_terms[:pending], out=weight_update))
        hinv.sub_(torch.mm(u_terms[:pending].T, u_terms[:pending], out=hinv_update))
        pending = 0
        return torch.mul(weight, weight, out=weight_update).sum(0), hinv.diagonal().clone()  # the buffer is free again

    column_norms, diagonal = flush()
    results, damped_at, damped = [], [], 0.0
    for count in range(d_in + 1):
        if snapshots[len(results)] == count:
            column_norms, diagonal = flush()
            while snapshots[len(results) :] and snapshots[len(results)] == count:
                results.append(_snapshot(weight, removed, 1))
                damped_at.append(damped)
            if len(results) == len(snapshots):
                break
            if _only_everything_left(snapshots, len(results), d_in):
                results.append(_everything_removed(weight, d_in))
                break
        scores = torch.where(removed, torch.inf, column_norms / diagonal)
        j = int(scores.argmin())
        row = hinv[j] - u_terms[:pending, j] @ u_terms[:pending]  # Hinv[j, :]
        column = weight[:, j] - a_terms[:, :pending] @ b_terms[:pending, j]  # W[:, j]
        step = row / row[j]
        column_square = column @ column
        # the exact damped-error increase ‖W[:, j]‖² / Hinv[j, j] of this removal, from the true (not running) values
        damped += float(column_square) / float(row[j])
        # W' = W − column·stepᵀ, so  ‖W'[:, i]‖² = ‖W[:, i]‖² − 2·step_i·(columnᵀW[:, i]) + step_i²·‖column‖²
        column_dot_w = column @ weight - (column @ a_terms[:, :pending]) @ b_terms[:pending]
        column_norms += step * (step * column_square - 2 * column_dot_w)
        diagonal -= row * step
        a_terms[:, pending], b_terms[pending], u_terms[pending] = column, step, row / row[j].sqrt()
        pending += 1
        removed[j] = True
        if pending == batch:
            column_norms, diagonal = flush()
    return results, _damped_or_skipped(damped_at, results)


def prune_ladder(weight: torch.Tensor, hessian: torch.Tensor, unit_size: int, snapshots: list[int],
                 relative_damping: float, params_freed: ParamsFreed | None = None, eligible: Eligible | None = None
                 ) -> tuple[list[PrunedWeights], list[float], float]:
    """Every level of one module: (levels, each level's output error relative to the dense output energy, that
    energy tr(W H Wᵀ)). weight: (d_out, d_in) dense; hessian: (d_in, d_in) undamped.

    The relative error ‖WX − ŴX‖² / ‖WX‖² is what makes errors of different modules comparable (an informed
    start sums them across the model); a level with everything removed has relative error 1. It comes from the
    greedy's damped error with the damping's share taken off: ‖ΔW‖²_H = ‖ΔW‖²_{H+D} − Σ_i D_i ‖ΔW[:, i]‖², one
    pass over the weights per level instead of a k² quadratic form (the float32 greedy's sum agrees with
    `reconstruction_error` to 1e-8 on a SmolLM2 MLP layer, to 6e-6 on the tests' ill-conditioned H).
    """
    levels, damped = greedy_path(weight, inverse_hessian(hessian, relative_damping), unit_size, snapshots,
                                 params_freed, eligible)
    dense = weight.double()
    energy = float(((dense @ hessian.double()) * dense).sum())
    # D, what `dampen` adds to the diagonal: 1 where an input was always zero, then λ · mean of that lifted diagonal
    diagonal = hessian.diagonal().double()
    dead = diagonal == 0
    added = dead.double() + relative_damping * torch.where(dead, 1.0, diagonal).mean()
    column_damping = (dense.square() * added.to(dense.device)).reshape(dense.shape[0], -1, unit_size).sum((0, 2))
    errors = []
    for pruned, damped_error in zip(levels, damped):
        if pruned.units_removed == 0:  # nothing removed, nothing moved
            errors.append(0.0)
            continue
        if pruned.kept_units.numel() == 0:
            errors.append(1.0 if energy > 0 else 0.0)
            continue
        kept = pruned.kept_units.to(weight.device)
        columns = unit_columns(kept, unit_size)
        # a removed column's ΔW is the dense column; a kept one's is what OBS moved it by
        moved = (dense[:, columns] - pruned.weight.to(dense)).square().sum(0) @ added.to(dense)[columns]
        damping_share = float(column_damping.sum() - column_damping[kept].sum() + moved)
        error = max(damped_error - damping_share, 0.0)  # rounding may leave a tiny negative at a zero error
        errors.append(error / energy if energy > 0 else 0.0)
    return levels, errors, energy


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖WX − ŴX‖² up to the factor n/2 shared by every candidate: tr(ΔW H ΔWᵀ), H undamped.

    weight, pruned: (d_out, d_in) with removed columns of `pruned` zero; hessian: (d_in, d_in) = 2/n Σ xxᵀ.
    """
    delta = (weight - pruned).double()
    return float(((delta @ hessian.double()) * delta).sum())
