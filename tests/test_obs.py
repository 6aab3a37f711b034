"""Greedy structured OBS: identity at zero, better than magnitude, lazy == direct path, greedy == brute force."""

import math

import pytest
import torch

from darwinlm.core.database.obs import (
    greedy_columns,
    greedy_groups,
    dampen,
    greedy_prune,
    inverse_hessian,
    prune_ladder,
    reconstruction_error,
)
from darwinlm.core.database.structure import level_ladder

DAMPING = 0.01


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def synthetic(d_out: int, d_in: int, seed: int = 0, tokens: int = 512, private: float = 0.3, per_factor: int = 4):
    """W (d_out, d_in) and H = 2/n XᵀX of correlated inputs X (n, d_in), all float32."""
    generator = torch.Generator().manual_seed(seed)
    # Strongly correlated inputs (a few shared factors plus a weak private part), as in real activations:
    # with near-diagonal H every update would be tiny and the tests below would prove little.
    factors = max(2, d_in // per_factor)
    shared = torch.randn(tokens, factors, generator=generator) @ torch.randn(factors, d_in, generator=generator)
    noise = private * torch.randn(tokens, d_in, generator=generator)
    scales = torch.rand(d_in, generator=generator) * 2 + 0.1  # columns of very different energy
    x = (shared + noise) * scales
    hessian = 2.0 / tokens * x.T @ x
    weight = torch.randn(d_out, d_in, generator=generator)
    return weight, hessian


def scatter(pruned, d_in: int, unit_size: int) -> torch.Tensor:
    """The dense-width (d_out, d_in) weight of a snapshot, zeros in removed columns."""
    full = torch.zeros(pruned.weight.shape[0], d_in)
    columns = (pruned.kept_units[:, None] * unit_size + torch.arange(unit_size)).flatten()
    full[:, columns] = pruned.weight
    return full


def magnitude_pruned(weight: torch.Tensor, unit_size: int, removed: int) -> torch.Tensor:
    """Zero the `removed` unit column groups with the smallest Frobenius norm; no update."""
    norms = weight.reshape(weight.shape[0], -1, unit_size).pow(2).sum((0, 2))
    drop = norms.argsort()[:removed]
    pruned = weight.clone().reshape(weight.shape[0], -1, unit_size)
    pruned[:, drop] = 0
    return pruned.reshape_as(weight)


@pytest.mark.parametrize("unit_size", [1, 8])
def test_removing_nothing_is_identity(unit_size):
    weight, hessian = synthetic(12, 32)
    hinv = inverse_hessian(hessian, DAMPING)
    weight_before, hinv_before = weight.clone(), hinv.clone()
    snapshot = greedy_prune(weight, hinv, unit_size, [0, 1])[0]
    assert snapshot.units_removed == 0
    assert torch.equal(snapshot.kept_units, torch.arange(32 // unit_size))
    assert torch.equal(snapshot.weight, weight)
    # inputs are left untouched
    assert torch.equal(weight, weight_before) and torch.equal(hinv, hinv_before)


@pytest.mark.parametrize("unit_size,d_in", [(1, 96), (8, 64), (16, 64)])
def test_obs_beats_magnitude_at_every_level(unit_size, d_in):
    weight, hessian = synthetic(24, d_in, seed=unit_size)
    n_units = d_in // unit_size
    ladder = level_ladder(n_units, 8)
    levels = greedy_prune(weight, inverse_hessian(hessian, DAMPING), unit_size, ladder)
    assert [p.units_removed for p in levels] == ladder
    for pruned in levels:
        obs = reconstruction_error(weight, scatter(pruned, d_in, unit_size), hessian)
        magnitude = reconstruction_error(weight, magnitude_pruned(weight, unit_size, pruned.units_removed), hessian)
        assert obs <= magnitude * (1 + 1e-5) + 1e-6, (pruned.units_removed, obs, magnitude)
        if 0 < pruned.units_removed < n_units:
            assert obs < magnitude  # strictly better once something is removed and something is left
    assert reconstruction_error(weight, scatter(levels[0], d_in, unit_size), hessian) == 0.0
    assert levels[-1].weight.shape == (24, 0) and levels[-1].kept_units.numel() == 0


@pytest.mark.parametrize("d_in,batch", [(40, 128), (150, 128), (150, 8)])  # batch 8: many full-batch flushes
def test_lazy_columns_match_direct_groups(d_in, batch):
    # Very strongly correlated inputs: the lazy running norms and diagonal then decide close calls.
    weight, hessian = synthetic(16, d_in, seed=d_in, private=0.1, per_factor=2)
    hinv = inverse_hessian(hessian, DAMPING)
    # Sparse snapshots: each one flushes the pending downdates, so a snapshot at every step would never
    # exercise the lazy running norms and diagonal between flushes.
    snapshots = sorted({0, 1, 7, d_in // 3, d_in // 2 + 3, d_in - 5, d_in})
    # between snapshots 78 and 145 more than 8 downdates pend: the flush on a full batch runs (at 128 it
    # only runs on models wider than these tests)
    lazy, lazy_damped = greedy_columns(weight.clone(), hinv.clone(), 1, snapshots, batch=batch)
    direct, direct_damped = greedy_groups(weight.clone(), hinv.clone(), 1, snapshots)
    assert len(lazy) == len(direct) == len(snapshots)
    for a, b in zip(lazy, direct):
        assert torch.equal(a.kept_units, b.kept_units), a.units_removed
        scale = max(1.0, b.weight.abs().max().item()) if b.weight.numel() else 1.0
        assert torch.allclose(a.weight, b.weight, atol=1e-4 * scale, rtol=1e-4), a.units_removed
    # both sum each removal's exact damped-error increase; the last snapshot (everything) is skipped: NaN
    assert lazy_damped[:-1] == pytest.approx(direct_damped[:-1], rel=1e-4)
    assert math.isnan(lazy_damped[-1]) and math.isnan(direct_damped[-1])


def optimal_error_without(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Brute force: remove `columns`, refit the rest by least squares under `hessian`. Returns (error, Ŵ)."""
    keep = torch.ones(weight.shape[1], dtype=torch.bool)
    keep[columns] = False
    w, h = weight.double(), hessian.double()
    # min over Ŵ_K of tr((W − Ŵ) H (W − Ŵ)ᵀ) with Ŵ_J = 0  ⇒  Ŵ_K = W_K + W_J H_JK H_KK⁻¹
    refit = w[:, keep] + w[:, ~keep] @ h[~keep][:, keep] @ torch.linalg.inv(h[keep][:, keep])
    pruned = torch.zeros_like(w)
    pruned[:, keep] = refit
    return reconstruction_error(weight, pruned, hessian), pruned.float()


@pytest.mark.parametrize("unit_size", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_greedy_step_is_the_exact_best_unit(unit_size, seed):
    d_in = 24
    weight, hessian = synthetic(10, d_in, seed=seed)
    damped = dampen(hessian.double(), DAMPING).float()  # the Hessian OBS actually optimizes against
    first = greedy_prune(weight, inverse_hessian(hessian, DAMPING), unit_size, [1])[0]
    errors = []
    for unit in range(d_in // unit_size):
        errors.append(optimal_error_without(weight, damped, torch.arange(unit * unit_size, (unit + 1) * unit_size)))
    best = min(range(len(errors)), key=lambda u: errors[u][0])
    removed = sorted(set(range(d_in // unit_size)) - set(first.kept_units.tolist()))
    assert removed == [best]
    # and the update is the optimal one
    error, optimal = errors[best]
    assert torch.allclose(scatter(first, d_in, unit_size), optimal, atol=1e-4)
    assert reconstruction_error(weight, scatter(first, d_in, unit_size), damped) == pytest.approx(error, rel=1e-4)


@pytest.mark.parametrize("unit_size", [1, 4])
def test_levels_are_nested(unit_size):
    weight, hessian = synthetic(8, 48, seed=5)
    n_units = 48 // unit_size
    levels = greedy_prune(weight, inverse_hessian(hessian, DAMPING), unit_size, level_ladder(n_units, 5))
    kept_sets = [set(p.kept_units.tolist()) for p in levels]
    for pruned, kept in zip(levels, kept_sets):
        assert len(kept) == n_units - pruned.units_removed
        assert pruned.kept_units.tolist() == sorted(kept)  # ascending
        assert pruned.weight.shape == (8, len(kept) * unit_size)
    for larger, smaller in zip(kept_sets, kept_sets[1:]):
        assert smaller < larger  # strictly shrinking and nested


def test_greedy_prune_rejects_bad_arguments():
    weight, hessian = synthetic(4, 12)
    hinv = inverse_hessian(hessian, DAMPING)
    with pytest.raises(ValueError):
        greedy_prune(weight, hinv, 5, [0])  # 12 columns are not whole units of 5
    with pytest.raises(ValueError):
        greedy_prune(weight, hinv, 1, [3, 1])  # not ascending
    with pytest.raises(ValueError):
        greedy_prune(weight, hinv, 4, [0, 4])  # only 3 units


@pytest.mark.parametrize("n_units", [1, 3, 4, 9, 10, 96, 1536])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 20])
def test_level_ladder(n_units, steps):
    ladder = level_ladder(n_units, steps)
    assert ladder[0] == 0 and ladder[-1] == n_units
    gaps = [b - a for a, b in zip(ladder, ladder[1:])]
    assert all(gap > 0 for gap in gaps)
    if steps <= n_units:
        assert len(ladder) == steps + 1
        assert set(gaps) <= {n_units // steps, -(-n_units // steps)}  # even: floor or ceil of n/steps
    else:
        assert ladder == list(range(n_units + 1))  # more steps than units: every count once


def test_level_ladder_rejects_zero_steps():
    with pytest.raises(ValueError):
        level_ladder(10, 0)


def test_dampen_handles_dead_inputs():
    hessian = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    damped = dampen(hessian, 0.5)
    assert torch.all(damped.diagonal() > 0)
    assert torch.equal(hessian, torch.diag(torch.tensor([2.0, 0.0, 4.0])))  # input unchanged
    torch.linalg.cholesky(damped)  # positive definite


@pytest.mark.parametrize("unit_size,d_in,dead", [(1, 48, False), (8, 64, False), (1, 48, True), (8, 64, True)])
def test_ladder_errors_are_reconstruction_errors_relative_to_the_output_energy(unit_size, d_in, dead):
    """The errors come from the greedy's damped scores minus the damping's share; they must be the undamped
    reconstruction errors of the levels returned (inputs that were always zero included: dampen lifts those)."""
    weight, hessian = synthetic(16, d_in, seed=3)
    if dead:  # inputs 0 and 9 never fire: zero rows and columns of H
        hessian[[0, 9], :], hessian[:, [0, 9]] = 0.0, 0.0
    ladder = level_ladder(d_in // unit_size, 6)
    levels, errors, energy = prune_ladder(weight, hessian, unit_size, ladder, DAMPING)
    for pruned, alone in zip(levels, greedy_prune(weight, inverse_hessian(hessian, DAMPING), unit_size, ladder)):
        assert torch.equal(pruned.kept_units, alone.kept_units) and torch.equal(pruned.weight, alone.weight)
    assert energy == float(((weight.double() @ hessian.double()) * weight.double()).sum())
    assert errors[0] == 0.0 and errors[-1] == 1.0  # nothing removed / everything removed
    for pruned, error in zip(levels, errors):
        expected = reconstruction_error(weight, scatter(pruned, d_in, unit_size), hessian) / energy
        # float32 greedy on a deliberately ill-conditioned H: up to ~6e-6 apart; leaving out the damping's share
        # would be ~1e-2 off
        assert error == pytest.approx(expected, rel=2e-5)
    assert errors == sorted(errors)  # greedy removal sets are nested: the error only grows


def test_ladder_errors_with_cost_aware_order_are_reconstruction_errors():
    """With a params_freed ranking the greedy picks by score per parameter but must add the raw score."""
    shape = _attention_shape(query_heads=6, kv_heads=2, head_dim=4, hidden=24)
    weight, hessian = synthetic(24, 24, seed=11)
    ladder = level_ladder(6, 6)
    levels, errors, energy = prune_ladder(weight, hessian, 4, ladder, DAMPING, shape.params_freed)
    for pruned, error in zip(levels, errors):
        assert error == pytest.approx(reconstruction_error(weight, scatter(pruned, 24, 4), hessian) / energy, rel=2e-5)


def test_unit_columns_and_scatter_units_place_whole_units():
    from darwinlm.core.database.structure import scatter_units, unit_columns

    assert unit_columns(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    full = scatter_units(torch.arange(6.0).view(1, 6), torch.tensor([0, 2]), n_units=3, unit_size=3)
    assert full.tolist() == [[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 5.0]]


@pytest.mark.parametrize("unit_size,d_in", [(1, 48), (8, 64)])
def test_greedy_shortcuts_give_the_bits_of_the_full_path(unit_size, d_in, monkeypatch):
    """Skipped work: the greedy stops once only "everything removed" is left, with the full path's bits exactly,
    and the ladder's errors are the general quadratic form's values at every level."""
    from darwinlm.core.database import obs

    weight, hessian = synthetic(16, d_in, seed=5)
    ladder = level_ladder(d_in // unit_size, 6)
    short, errors, energy = prune_ladder(weight, hessian, unit_size, ladder, DAMPING)
    monkeypatch.setattr(obs, "_only_everything_left", lambda *args: False)
    full = greedy_prune(weight, inverse_hessian(hessian, DAMPING), unit_size, ladder)
    for a, b in zip(short, full):
        assert a.units_removed == b.units_removed and torch.equal(a.kept_units, b.kept_units)
        assert a.weight.shape == b.weight.shape and torch.equal(a.weight, b.weight)
    dense = weight.double()
    full_errors = []
    for pruned in full:  # the general formula, at every level
        delta = dense.clone()
        delta[:, (pruned.kept_units[:, None] * unit_size + torch.arange(unit_size)).flatten()] -= pruned.weight.double()
        full_errors.append(float(((delta @ hessian.double()) * delta).sum()) / energy)
    assert errors == pytest.approx(full_errors, rel=2e-5, abs=1e-12)


# ------------------------------------------------------------------------- GQA: score per parameter freed


def _attention_shape(query_heads: int, kv_heads: int, head_dim: int, hidden: int):
    from darwinlm.core.database.structure import ModuleShape
    from darwinlm.core.model.arch import HeadLayout

    layout = HeadLayout(query_heads=query_heads, kv_heads=kv_heads, head_dim=head_dim)
    return ModuleShape("attn", query_heads, head_dim, hidden, layout, "query_heads")


def test_params_freed_counts_the_kv_rows_of_a_groups_last_head():
    """SmolLM2's layout: 9 query heads over 3 KV heads, head_dim 64, hidden 576."""
    shape = _attention_shape(9, 3, 64, 576)
    plain_head, last_head = 64 * 576 * 2, 64 * 576 * 4  # q rows + o columns; and the group's k and v rows
    removed = torch.zeros(9, dtype=torch.bool)
    assert shape.params_freed(removed).tolist() == [plain_head] * 9
    removed[[0, 1, 3]] = True  # head 2 is now the last of group 0
    assert shape.params_freed(removed).tolist() == [0, 0, last_head, 0] + [plain_head] * 5
    kept = (~removed).nonzero().flatten()
    for unit in kept.tolist():  # the definition: what params_kept loses
        assert shape.params_freed(removed)[unit] == shape.params_kept(kept) - shape.params_kept(kept[kept != unit])


def _separable_heads(norms: list[float], head_dim: int = 4, hidden: int = 8):
    """o_proj weight whose head h has squared Frobenius norm norms[h], and an identity Hessian: OBS scores are
    then those norms (times 1 + damping) at every step, since no removal updates another head's columns."""
    generator = torch.Generator().manual_seed(0)
    heads = []
    for norm in norms:
        block = torch.randn(hidden, head_dim, generator=generator)
        heads.append(block * (norm / block.pow(2).sum()).sqrt())
    return torch.cat(heads, dim=1), torch.eye(len(norms) * head_dim)


def _removal_order(levels) -> list[int]:
    kept = [set(pruned.kept_units.tolist()) for pruned in levels]
    return [(before - after).pop() for before, after in zip(kept, kept[1:])]


def test_cost_aware_greedy_completes_a_cheap_kv_group_earlier():
    """4 query heads over 2 KV groups {0, 1}, {2, 3}. By score alone the order is 0, 2, 1, 3 and group 0 is
    emptied at the third step. Per parameter, once head 0 is gone head 1 frees twice a plain head (its k/v
    too), and 1.5 / 2 < 1.0: it goes second, and the second level is cheaper in parameters."""
    shape = _attention_shape(4, 2, head_dim=4, hidden=8)
    weight, hessian = _separable_heads([0.1, 1.5, 1.0, 3.0])
    hinv, ladder = inverse_hessian(hessian, DAMPING), [0, 1, 2, 3, 4]
    plain = greedy_prune(weight, hinv, 4, ladder)
    aware = greedy_prune(weight, hinv, 4, ladder, shape.params_freed)
    assert _removal_order(plain) == [0, 2, 1, 3]
    assert _removal_order(aware) == [0, 1, 2, 3]
    params = {name: [shape.params_kept(p.kept_units) for p in levels] for name, levels in
              (("plain", plain), ("aware", aware))}
    for costs in params.values():  # still a valid ladder: each level costs less than the one before
        assert all(a > b for a, b in zip(costs, costs[1:]))
    assert params["aware"][2] < params["plain"][2]
    assert params["aware"][0] == params["plain"][0] and params["aware"][-1] == params["plain"][-1] == 0


def test_equal_costs_leave_the_plain_order():
    """Dividing every score by the same count ranks exactly as the scores do: the option only acts through
    the KV rows a group's last head frees."""
    weight, hessian = synthetic(12, 48, seed=3)
    hinv, ladder = inverse_hessian(hessian, DAMPING), level_ladder(6, 6)
    plain = greedy_prune(weight, hinv, 8, ladder)
    equal = greedy_prune(weight, hinv, 8, ladder, lambda removed: torch.full((6,), 1024.0))
    assert [p.kept_units.tolist() for p in plain] == [p.kept_units.tolist() for p in equal]
