"""Refit of a chosen genome: identity at level 0, never a worse reconstruction than the database's weights on
the same (propagated) inputs, the database's shapes, and assembly exactly as database levels; the dense target's
closed form is the least-squares fit to the dense model's module outputs."""

import random

import pytest
import torch

from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.search.genome import module_keys
from darwinlm.core.database.refit import InputMoments, RefitDatabase, RefitResult, fit_kept, refit_genome
from darwinlm.core.errors import DarwinLMError
from tests.support.tiny_models import PLAIN_LADDERS, random_token_rows, tiny_model

CALIBRATION = random_token_rows(128, rows=8, seq_len=32, seed=1)
STEPS = 4
with torch.no_grad():
    DENSE_LOGITS = tiny_model("llama", seed=3)(CALIBRATION).logits

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{gqa_mode: database} of one tiny GQA llama (float32 storage: the comparisons below are then exact)."""
    base = tmp_path_factory.mktemp("refit")
    return {mode: build_database(tiny_model("llama", seed=3), CALIBRATION, str(base), calibration_digest="c",
                                 config=DatabaseConfig(level_steps=STEPS, gqa_mode=mode, storage_dtype="float32",
                                                        **PLAIN_LADDERS))
            for mode in ("query_heads", "kv_groups")}


def _genomes(database, seed: int):
    rng = random.Random(seed)
    keys = module_keys(database)
    yield {key: 0 for key in keys}
    yield {key: 2 for key in keys}  # uniform half
    yield {key: rng.randrange(database.num_levels(*key)) for key in keys}  # last levels included


@pytest.mark.parametrize("dense_weight", [0.0, 0.3])
def test_refit_at_level_zero_is_the_identity(built, dense_weight):
    model, database = tiny_model("llama", seed=3), built["query_heads"]
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = refit_genome(model, database, {key: 0 for key in module_keys(database)}, CALIBRATION, batch_size=3,
                          dense_weight=dense_weight)
    for (layer, kind), pruned in result.weights.items():
        block = model.model.layers[layer]
        weight = block.self_attn.o_proj.weight if kind == "attn" else block.mlp.down_proj.weight
        assert pruned.units_removed == 0 and pruned.weight.shape == weight.shape
        assert torch.allclose(pruned.weight, weight, rtol=1e-4, atol=1e-5), (layer, kind)
        # (G and H of identical streams agree to float32 rounding: they are summed in different orders)
        assert result.errors[(layer, kind)][1] < 1e-7
    assert len(result.weights) == 2 * len(model.model.layers)
    for name, parameter in model.named_parameters():  # the model is left dense
        assert torch.equal(parameter, dense[name]), name


def test_refit_of_the_first_module_reproduces_the_database():
    """On dense inputs (layer 0's attention sees no pruned layer) the closed form equals the greedy's weights."""
    model = tiny_model("llama", seed=3)
    driver = BlockDriver(model, CALIBRATION)
    from darwinlm.core.database.hessians import collect_block_hessians
    from darwinlm.core.database.obs import greedy_prune, inverse_hessian

    with collect_block_hessians(driver.blocks[0], driver.spec) as accumulators:
        driver.advance()
    for kind, weight in (("attn", model.model.layers[0].self_attn.o_proj.weight),
                         ("mlp", model.model.layers[0].mlp.down_proj.weight)):
        hessian, unit_size = accumulators[kind].hessian(), 16 if kind == "attn" else 1
        n_units = weight.shape[1] // unit_size
        greedy = greedy_prune(weight.detach(), inverse_hessian(hessian, 0.01), unit_size, [n_units // 2])[0]
        refit = fit_kept(weight.detach(), hessian, greedy.kept_units, unit_size, 0.01)
        assert torch.allclose(refit, greedy.weight, rtol=1e-3, atol=1e-4), kind


@pytest.mark.parametrize("gqa_mode", ["query_heads", "kv_groups"])
@pytest.mark.parametrize("reselect", [False, True], ids=["same-units", "reselect"])
@pytest.mark.parametrize("dense_weight", [0.0, 0.3, 1.0])
def test_refit_never_raises_reconstruction_error_and_keeps_shapes(built, gqa_mode, reselect, dense_weight):
    database = built[gqa_mode]
    for seed, levels in enumerate(_genomes(database, seed=7)):
        model = tiny_model("llama", seed=3)
        result = refit_genome(model, database, levels, CALIBRATION, reselect=reselect,
                              dense_weight=dense_weight)
        for (layer, kind), level in levels.items():
            if level == database.num_levels(layer, kind) - 1:
                assert (layer, kind) not in result.weights  # a removed module has nothing to fit
                continue
            refit = result.weights[(layer, kind)]
            before, after = result.errors[(layer, kind)]
            assert after <= before * (1 + 1e-6) + 1e-9, (seed, layer, kind, before, after)
            if level > 0:
                stored = database.load(layer, kind, level)
                assert refit.weight.shape == stored.weight.shape and refit.weight.dtype == stored.weight.dtype
                assert refit.units_removed == stored.units_removed
                if not reselect:
                    assert torch.equal(refit.kept_units, stored.kept_units)


@pytest.mark.parametrize("dense_weight", [0.3, 1.0])
def test_blended_target_fit_is_least_squares(dense_weight):
    """fit_kept with InputMoments' blend: Ŵ_S minimises ‖W T − Ŵ_S X_S‖² for target inputs T = X + w (X_d − X)
    (+ the damping's pull towards W), checked against lstsq on the stacked, ridge-augmented system; the moments
    pair the two streams row for row, and the blended D gives the target's energy."""
    generator = torch.Generator().manual_seed(0)
    d_in, d_out, unit_size, damping, n = 12, 5, 2, 0.01, 300
    dense_x = torch.randn(n, d_in, generator=generator)
    pruned_x = dense_x + 0.5 * torch.randn(n, d_in, generator=generator)  # the layers below perturbed it
    weight = torch.randn(d_out, d_in, generator=generator)
    moments = InputMoments(d_in, dense_x)
    for batch in pruned_x.split(70):  # uneven batches, as a driver's last batch is; 3-d like a block's
        moments.add(batch.reshape(-1, 5, d_in))
    target_x = (pruned_x + dense_x.sub(pruned_x) * dense_weight).double()
    h, g, d = moments.blended(dense_weight)
    assert torch.allclose(g, target_x.T @ pruned_x.double() * (2 / n), rtol=1e-5, atol=1e-5)
    assert torch.allclose(d, target_x.T @ target_x * (2 / n), rtol=1e-5, atol=1e-5)
    kept = torch.tensor([0, 2, 3, 5])
    columns = torch.cat([torch.arange(u * unit_size, (u + 1) * unit_size) for u in kept.tolist()])
    fitted = fit_kept(weight, h.float(), kept, unit_size, damping, g)
    # the same objective written out: rows of √(2/n)·X_S against √(2/n)·W T, plus √λ rows pulling Ŵ_S to W_S
    lam = (damping * h.diagonal().mean()).sqrt()
    design = torch.cat([pruned_x[:, columns].double() * (2 / n) ** 0.5, lam * torch.eye(len(columns))])
    wanted = torch.cat([target_x @ weight.T.double() * (2 / n) ** 0.5, lam * weight[:, columns].T.double()])
    expected = torch.linalg.lstsq(design, wanted).solution.T.float()
    assert torch.allclose(fitted, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fitted, fit_kept(weight, h.float(), kept, unit_size, damping), atol=1e-2)


def test_partial_dense_target_lowers_calibration_error_below_the_propagated_one(built):
    """The point of the dense pull: each module also makes up for part of what the layers below lost, so the
    pruned model's logits end closer to the dense model's on the data it was fitted on."""
    database = built["query_heads"]
    levels = {key: 2 for key in module_keys(database)}
    losses = {}
    for dense_weight in (0.0, 0.3):
        model = tiny_model("llama", seed=3)
        LiveAssembly(model, RefitDatabase(database, refit_genome(model, database, levels, CALIBRATION,
                                                                 dense_weight=dense_weight))).apply(levels)
        losses[dense_weight] = _calibration_error(model)
    assert losses[0.3] < losses[0.0]


@pytest.mark.parametrize("dense_weight", [-0.1, 1.5])
def test_dense_weight_outside_the_unit_interval_is_a_clear_error(built, dense_weight):
    with pytest.raises(DarwinLMError, match=r"outside \[0, 1\]"):
        refit_genome(tiny_model("llama", seed=3), built["query_heads"], {}, CALIBRATION, dense_weight=dense_weight)


def _calibration_error(model) -> float:
    """‖logits − dense logits‖² on the calibration rows: what the refit tries to shrink, layer by layer."""
    with torch.no_grad():
        return float((model(CALIBRATION).logits - DENSE_LOGITS).pow(2).sum())


def test_refit_database_assembles_like_the_database_and_serializes(built):
    database = built["query_heads"]
    levels = {key: 2 for key in module_keys(database)}
    model = tiny_model("llama", seed=3)
    result = refit_genome(model, database, levels, CALIBRATION)
    assembly = LiveAssembly(model, database)
    assembly.apply(levels)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    loss_database, kept = _calibration_error(model), assembly.kept_params()

    again = RefitResult.from_bytes(result.to_bytes())
    assert again.levels == result.levels and again.errors == result.errors
    refitted = RefitDatabase(database, again)
    assert refitted.digest == database.digest
    model = tiny_model("llama", seed=3)
    assembly = LiveAssembly(model, refitted)
    assembly.apply(levels)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    assert assembly.kept_params() == kept
    o_proj = model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(o_proj, again.weights[(1, "attn")].weight)
    # the whole point: a pruned model closer to the data it was fitted on
    assert _calibration_error(model) < loss_database


def test_driver_observe_runs_hooks_without_advancing_and_stops_at_a_submodule():
    model = tiny_model("llama", seed=3)
    driver = BlockDriver(model, CALIBRATION, batch_size=3)
    driver.advance()
    hidden, seen = driver.hidden.clone(), []
    block = driver.blocks[1]
    handles = [module.register_forward_pre_hook(lambda *_, name=name: seen.append(name))
               for name, module in (("o_proj", block.self_attn.o_proj), ("down_proj", block.mlp.down_proj))]
    driver.observe(stop_at=block.self_attn.o_proj)
    assert seen == ["o_proj"] * 3  # three batches, each stopped before the MLP
    seen.clear()
    driver.observe()
    assert seen == ["o_proj", "down_proj"] * 3
    for handle in handles:
        handle.remove()
    assert driver.position == 1 and torch.equal(driver.hidden, hidden)


@pytest.mark.parametrize("aware", [False, True], ids=["plain", "gqa-cost-aware"])
def test_reselect_ranks_units_as_the_database_build_did(tmp_path, monkeypatch, aware):
    """Reselection re-runs the database's greedy: per parameter freed for query-head attention when the
    database was built so (a manifest without the option reads as plain), by score alone for the MLP."""
    from darwinlm.core.database import refit as refit_module

    database = build_database(tiny_model("llama", seed=3), CALIBRATION, str(tmp_path), calibration_digest="c",
                              config=DatabaseConfig(level_steps=STEPS, gqa_cost_aware=aware, storage_dtype="float32",
                                                    **PLAIN_LADDERS))
    ranked_by, original = [], refit_module.greedy_prune

    def recording(weight, hinv, unit_size, snapshots, params_freed=None, eligible=None):
        ranked_by.append((unit_size, params_freed))
        return original(weight, hinv, unit_size, snapshots, params_freed, eligible)

    monkeypatch.setattr(refit_module, "greedy_prune", recording)
    levels = {key: 2 for key in module_keys(database)}
    result = refit_genome(tiny_model("llama", seed=3), database, levels, CALIBRATION, reselect=True)
    assert len(ranked_by) == len(levels)
    for unit_size, params_freed in ranked_by:
        assert (params_freed is not None) == (aware and unit_size == 16)  # 16: a query head of o_proj
        if params_freed is not None:
            assert params_freed(torch.tensor([True, False, False, False])).tolist() == [0, 4096, 2048, 2048]  # head 1: the last of its group
    for (layer, kind), pruned in result.weights.items():  # the level's cost, whatever the reselection chose
        assert pruned.units_removed == database.load(layer, kind, 2).units_removed
