"""The peers of bench/peers on tiny models: each does what its paper says it does, and every one lands on the
budget, keeps KV groups even and leaves tied embeddings alone."""

import itertools
import random

import pytest
import torch

from bench.peers import LANDING_TOLERANCE, prune_with
from bench.peers import flap, shortgpt, slimgpt, ziplm_dp
from bench.peers.surgery import LayerShape, block_params, layer_shape
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.database.structure import module_shapes
from darwinlm.core.model.arch import arch_for
from darwinlm.core.search.genome import Budget
from tests.support.tiny_models import random_token_rows, tiny_model

NEW_PEERS = ("wanda_sp", "flap", "shortgpt", "slimgpt", "ziplm_dp")


def peer_options(name: str, model, rows, tmp_path) -> dict:
    if name != "ziplm_dp":
        return {}
    config = DatabaseConfig(storage_dtype="float32")
    return {"database": build_database(model, rows, str(tmp_path / "db"), calibration_digest="tiny", config=config)}


def capture_inputs(linear, model, rows) -> torch.Tensor:
    """`linear`'s inputs over a forward of `rows`, (tokens, d_in)."""
    captured = []
    handle = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(rows, use_cache=False)
    handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("name", NEW_PEERS)
@pytest.mark.parametrize("family", ["llama", "llama3"])  # GQA (4 query heads on 2 KV heads); tied embeddings
def test_every_peer_lands_on_the_budget_keeps_groups_even_and_leaves_embeddings(name, family, tmp_path):
    model = tiny_model(family, num_hidden_layers=6, intermediate_size=256)
    rows = random_token_rows(128, 8, 32)
    embedding = model.model.embed_tokens.weight.detach().clone()
    dense, shape = block_params(model), layer_shape(model)
    assert dense == sum(s.dense_params() for layer in module_shapes(model, arch_for(model), "query_heads")
                        for s in layer.values())  # the count darwinlm's Budget uses
    result = prune_with(name, model, rows, 0.5, **peer_options(name, model, rows, tmp_path))
    assert result.kept_block_params == block_params(model) and result.dense_block_params == dense
    assert abs(result.kept_block_params - round(0.5 * dense)) <= LANDING_TOLERANCE * 0.5 * dense
    assert result.kept_block_params < dense and result.wall_s > 0
    for layer, block in enumerate(model.model.layers):
        heads = result.kept_units[(layer, "attn")]
        counts = torch.bincount(heads // shape.group_size, minlength=shape.kv_heads)
        assert bool((counts == counts[0]).all()), (layer, heads)  # even KV groups, or the attention is gone
        if heads.numel():
            assert block.self_attn.k_proj.out_features == shape.kv_heads * shape.head_dim
            assert block.self_attn.q_proj.out_features == heads.numel() * shape.head_dim
        if result.kept_units[(layer, "mlp")].numel():
            assert block.mlp.down_proj.in_features == result.kept_units[(layer, "mlp")].numel()
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == model.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.isfinite(model(rows, use_cache=False).logits).all()


def test_flap_bias_keeps_each_pruned_module_s_output_mean_on_the_calibration_rows():
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=256)
    rows = random_token_rows(128, 8, 32)
    blocks = model.model.layers
    dense = {(i, kind): (linear.weight.detach().clone(), capture_inputs(linear, model, rows))
             for i, block in enumerate(blocks) for kind, linear in (("attn", block.self_attn.o_proj),
                                                                    ("mlp", block.mlp.down_proj))}
    first_attention_mean = (dense[(0, "attn")][1] @ dense[(0, "attn")][0].T).mean(0)
    result = flap.prune(model, rows, 0.5)
    checked = 0
    for (layer, kind), (weight, inputs) in dense.items():
        kept = result.kept_units[(layer, kind)]
        linear = blocks[layer].self_attn.o_proj if kind == "attn" else blocks[layer].mlp.down_proj
        head_dim = model.config.head_dim
        columns = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten() if kind == "attn" else kept
        if columns.numel() == weight.shape[1]:
            continue
        with torch.no_grad():
            pruned_mean = linear(inputs[:, columns]).mean(0)
            unbiased_mean = (inputs[:, columns] @ linear.weight.T).mean(0)
        dense_mean = (inputs @ weight.T).mean(0)
        assert torch.allclose(pruned_mean, dense_mean, atol=1e-4), (layer, kind)
        assert (unbiased_mean - dense_mean).abs().max() > 1e-2  # without the bias the mean moves
        checked += 1
    assert checked >= 4
    # live, in the pruned model: layer 0's attention sees the dense inputs at its kept heads
    if result.kept_units[(0, "attn")].numel() < 4:
        live = capture_inputs(blocks[0].self_attn.o_proj, model, rows)
        with torch.no_grad():
            assert torch.allclose(blocks[0].self_attn.o_proj(live).mean(0), first_attention_mean, atol=1e-4)


def test_shortgpt_removes_the_blocks_of_least_influence():
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # block 2 becomes nearly the identity: the least influence
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    rows = random_token_rows(128, 8, 32)
    influence = shortgpt.block_influence(model, rows)
    assert int(influence.argmin()) == 2
    result = shortgpt.prune(model, rows, 0.75)
    assert result.details["removed_blocks"] == [2] and result.details["removed_module"] is None
    assert result.kept_units[(2, "attn")].numel() == 0 and result.kept_units[(1, "attn")].numel() == 4
    # two blocks: the two least influential, on a model with no planted block
    model = tiny_model("llama", num_hidden_layers=4, seed=1)
    order = shortgpt.block_influence(model, rows).argsort().tolist()
    assert shortgpt.prune(model, rows, 0.5).details["removed_blocks"] == sorted(order[:2])


def test_shortgpt_completes_the_budget_with_one_module_of_the_next_block():
    influence = torch.tensor([0.5, 0.1, 0.3, 0.2])
    assert shortgpt.removal_plan(influence, 1, 3, 8) == ([1, 3], None)  # whole blocks land exactly
    assert shortgpt.removal_plan(influence, 1, 3, 5) == ([1], (3, "attn"))  # one block + the next one's attention
    assert shortgpt.removal_plan(influence, 1, 3, 7) == ([1], (3, "mlp"))


def test_slimgpt_schedule_prunes_deeper_layers_more():
    ratios = slimgpt.layer_ratios(30, 0.2)
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    steps = [b - a for a, b in zip(ratios, ratios[1:])]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # logarithmic: the increase slows with depth
    smollm2 = LayerShape(hidden=576, head_dim=64, query_heads=9, kv_heads=3, width=1536, qkv_bias=False, mlp_bias=False)
    for fraction in (0.3, 0.5):
        target = round(30 * smollm2.dense * (1 - fraction))
        plans = slimgpt.schedule(smollm2, 30, target)
        kept = [smollm2.even_attn_params(heads) + smollm2.mlp_params(channels) for heads, channels in plans]
        assert abs(sum(kept) - target) <= LANDING_TOLERANCE * target
        assert kept[0] > kept[-1] and kept[0] > smollm2.dense * (1 - fraction)
        # monotone in depth up to one MLP channel (each layer's share is rounded to whole channels)
        assert all(b <= a + smollm2.channel_params for a, b in zip(kept, kept[1:])), kept


@pytest.mark.parametrize("seed", range(5))
def test_ziplm_dp_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    costs = tuple(tuple(sorted((rng.randrange(1, 20) * 3 for _ in range(3)), reverse=True)) + (0,) for _ in range(4))
    errors = [[0.0] + sorted(rng.random() for _ in range(3)) for _ in range(4)]
    target = sum(c[0] for c in costs) // 2
    tolerance = max(c[i] - c[i + 1] for c in costs for i in range(3))
    budget = Budget(costs, target, tolerance, "params")
    feasible = [levels for levels in itertools.product(range(4), repeat=4) if budget.feasible(levels)]
    best = min(sum(errors[i][level] for i, level in enumerate(levels)) for levels in feasible)
    chosen = ziplm_dp.dp_levels(budget, errors)
    assert budget.feasible(chosen)
    assert sum(errors[i][level] for i, level in enumerate(chosen)) == pytest.approx(best)


def test_ziplm_dp_needs_the_database():
    with pytest.raises(ValueError, match="database"):
        ziplm_dp.prune(tiny_model("llama"), random_token_rows(128, 2, 8), 0.5)
