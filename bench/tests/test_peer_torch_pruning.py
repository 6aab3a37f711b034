"""The torch-pruning peer used by the benchmarks: both scopes hit their budget and leave a model that runs."""

import pytest
import torch

from bench.peers import torch_pruning as peer
from tests.support.tiny_models import random_token_rows, tiny_model


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_taylor_pruning_keeps_the_budget_and_runs(scope):
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=128, num_attention_heads=8)
    rows = random_token_rows(128, 4, 32)
    result = peer.prune_taylor(model, rows, 0.5, scope=scope)
    dense = result["dense_block_params"]
    assert result["kept_block_params"] == sum(p.numel() for m in peer.block_linears(model) for p in m.parameters())
    # uniform: as close as whole heads/channels allow; global: never above target, within one head unit below
    assert abs(result["kept_fraction"] - 0.5) < 0.03
    if scope == "global":
        assert result["kept_block_params"] <= 0.5 * dense
    else:
        assert len(set(result["heads_per_layer"])) == len(set(result["channels_per_layer"])) == 1
    assert all(h % 2 == 0 and h >= 2 for h in result["heads_per_layer"])  # equal heads per KV group, ≥ 1 each
    assert all(c >= 1 for c in result["channels_per_layer"])
    with torch.no_grad():
        logits = model(rows, use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_global_scope_differs_between_layers_when_importance_does():
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=128, num_attention_heads=8)
    with torch.no_grad():  # make layer 0's MLP matter far more than the others'
        model.model.layers[0].mlp.down_proj.weight.mul_(20.0)
    result = peer.prune_taylor(model, random_token_rows(128, 4, 32), 0.5, scope="global")
    assert result["channels_per_layer"][0] == max(result["channels_per_layer"])
    assert len(set(result["channels_per_layer"])) > 1
