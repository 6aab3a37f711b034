"""ShortGPT (Men et al., 2024): remove the whole decoder blocks that change the hidden states least.

Block Influence BI_i = 1 − E_tokens[cos(x_in, x_out)] of block i, measured once on the dense model over the
calibration rows; the blocks of least BI are removed (attention and MLP become darwinlm's zero modules, as a
database's "module removed" levels do: the block is the identity through its residual).

Landing on a parameter budget: whole blocks come in steps of one layer's parameters (3.3% of SmolLM2's block
parameters), so the removal set is the k least-influential blocks, plus optionally the attention or the MLP of the
next one in BI order (the departure from the paper, which removes whole blocks only), whichever of those lands
nearest the target; a one-line error if none is within 0.5%. On SmolLM2 at 30% and 50% whole blocks land exactly.
"""

import time

import torch

from bench.peers import PeerResult
from bench.peers.surgery import block_params, check_landing, remove_layer, start_pruning
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP


@torch.no_grad()
def block_influence(model, calibration_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """BI per block, (n_blocks,) float64: 1 − mean cosine similarity of each token's hidden state before and
    after the block, over the calibration rows (n, seq_len) int64."""
    driver = BlockDriver(model, calibration_ids, batch_size=batch_size)
    influence = []
    for _ in range(driver.num_blocks):
        before = driver.hidden.clone()
        driver.advance()
        cosine = torch.nn.functional.cosine_similarity(before.double(), driver.hidden.double(), dim=-1)
        influence.append(1.0 - float(cosine.mean()))
    return torch.tensor(influence, dtype=torch.float64)


def removal_plan(influence: torch.Tensor, attn_params: int, mlp_params: int, target_removed: int) -> tuple[list, str | None]:
    """(blocks removed whole, the module of the next block in BI order also removed: "attn", "mlp" or None) whose
    removed parameters are nearest `target_removed`; ties: fewer parameters removed."""
    order = influence.argsort().tolist()
    layer = attn_params + mlp_params
    best = None
    for whole in range(len(order) + 1):
        extras = [(None, 0)] + ([("attn", attn_params), ("mlp", mlp_params)] if whole < len(order) else [])
        for module, extra in extras:
            removed = whole * layer + extra
            key = (abs(removed - target_removed), removed)
            if best is None or key < best[0]:
                best = (key, whole, module)
    _, whole, module = best
    return sorted(order[:whole]), ((order[whole], module) if module else None)


@torch.no_grad()
def prune(model, calibration_ids: torch.Tensor, kept_fraction: float, *, batch_size: int = 8) -> PeerResult:
    """ShortGPT IN PLACE on a dense model (see the module docstring); calibration_ids: (n, seq_len) int64."""
    run = start_pruning(model, kept_fraction)
    start, shape, spec, blocks, dense, target = run.started, run.shape, run.spec, run.blocks, run.dense, run.target
    influence = block_influence(model, calibration_ids, batch_size)
    whole, partial = removal_plan(influence, shape.attn_params(shape.query_heads), shape.mlp_params(shape.width),
                                  dense - target)
    for layer in whole:
        remove_layer(model, layer)
    if partial:
        layer, module = partial
        setattr(blocks[layer], spec.attention if module == "attn" else spec.mlp,
                ZeroAttention(layer) if module == "attn" else ZeroMLP())
    kept = block_params(model)
    check_landing("shortgpt", kept, target)
    kept_units = {}
    for layer, block in enumerate(blocks):
        attention_gone, mlp_gone = isinstance(spec.attention_of(block), ZeroAttention), isinstance(spec.mlp_of(block), ZeroMLP)
        kept_units[(layer, "attn")] = torch.arange(0 if attention_gone else shape.query_heads)
        kept_units[(layer, "mlp")] = torch.arange(0 if mlp_gone else shape.width)
    return PeerResult(kept, dense, time.perf_counter() - start, kept_units,
                      {"block_influence": influence.tolist(), "removed_blocks": whole, "removed_module": partial})
