"""Peer baseline: uniform one-shot structured pruning of an HF Llama with torch-pruning (Taylor importance).

This is the "peer to measure against" of shared/STACK.md: every decoder layer keeps the same number of query heads
and MLP channels, chosen so that the kept parameters of the block linears (q, k, v, o, gate, up, down of every layer)
are as close as whole heads / channels allow to `target_block_fraction_kept` x dense. Attention and MLP keep (about)
the same fraction; all KV heads are kept and query heads are removed evenly within each KV group (GQA).

What torch-pruning (1.6.1, requirements/bench.txt) does here, and what it does not:
- its DependencyGraph is traced on the model (`forward_fn=lambda m, x: m(x, use_cache=False).logits`, as
  transformers 5 needs) and gives the coupled groups: q_proj-out -> o_proj-in, and gate/up-out -> down-in;
- its GroupTaylorImportance scores every channel from |w * dL/dw| with the gradients of the causal-LM loss on the
  calibration rows;
- its pruning functions (the group's own `prune()`) do the structural slicing.
The one thing done by hand: the q_proj group that the graph returns also carries k_proj and v_proj (it treats the
fused attention op as element-wise, so it maps the 576 query channels 1:1 onto the 192 key/value rows, which is
wrong for GQA; rooted at k_proj it crashes). Since every KV head is kept anyway, those k/v items are dropped from the
group, both for scoring (STACK.md: keep k/v rows out of head scoring) and for slicing, leaving exactly q_proj-out and
o_proj-in. Heads are picked per KV group here rather than by MetaPruner, whose head counts are ratio-based
(ceil per group; its global head total is also wrong for GQA, 90 instead of 270 on SmolLM2) and cannot hit an exact
per-layer budget. After pruning, each attention's `num_key_value_groups` is set to q_out // k_out; `model.config`
is left stale (forward does not read the head counts from it).
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

__all__ = ["prune", "prune_taylor", "prune_uniform_taylor", "plan_uniform", "block_linears"]


def block_linears(model) -> list[nn.Linear]:
    """The seven block linears of every decoder layer, in layer order."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return out


def _count(modules) -> int:
    return sum(p.numel() for mod in modules for p in mod.parameters(recurse=False))


def _layer_shape(layer) -> dict:
    a, m = layer.self_attn, layer.mlp
    head_dim = a.head_dim
    n_q = a.q_proj.out_features // head_dim
    n_kv = a.k_proj.out_features // head_dim
    hidden = a.q_proj.in_features
    # parameters that one query head / one MLP channel carries (rows of q, columns of o, and their biases)
    per_head = head_dim * hidden + (head_dim if a.q_proj.bias is not None else 0) + head_dim * hidden
    per_channel = 2 * (hidden + (1 if m.gate_proj.bias is not None else 0)) + hidden
    attn_dense = _count([a.q_proj, a.k_proj, a.v_proj, a.o_proj])
    mlp_dense = _count([m.gate_proj, m.up_proj, m.down_proj])
    return dict(
        head_dim=head_dim, n_q=n_q, n_kv=n_kv, inter=m.gate_proj.out_features, per_head=per_head,
        per_channel=per_channel, attn_dense=attn_dense, mlp_dense=mlp_dense,
        attn_fixed=attn_dense - n_q * per_head,  # k, v, o bias: kept whatever the head count
        mlp_fixed=mlp_dense - m.gate_proj.out_features * per_channel,  # down bias
    )


def plan_uniform(model, target_block_fraction_kept: float) -> tuple[int, int, int, int]:
    """(query heads kept per layer, MLP channels kept per layer, kept block params, dense block params).

    Heads: a multiple of the KV head count (even removal within each KV group), chosen so the attention fraction is
    closest to the target (ties: more heads). Channels: whatever brings the layer total closest to the target.
    """
    if not 0.0 < target_block_fraction_kept <= 1.0:
        raise ValueError(f"target_block_fraction_kept must be in (0, 1], got {target_block_fraction_kept}")
    shapes = [_layer_shape(layer) for layer in model.model.layers]
    s = shapes[0]
    if any(t != s for t in shapes):
        raise ValueError("prune_uniform_taylor expects a dense model whose layers all have the same shape")
    if s["n_q"] % s["n_kv"]:
        raise ValueError(f"{s['n_q']} query heads do not split into {s['n_kv']} KV groups")
    target = target_block_fraction_kept
    candidates = range(s["n_kv"], s["n_q"] + 1, s["n_kv"])
    attn_kept = lambda h: s["attn_fixed"] + h * s["per_head"]  # noqa: E731
    heads = min(candidates, key=lambda h: (abs(attn_kept(h) / s["attn_dense"] - target), -h))
    layer_dense = s["attn_dense"] + s["mlp_dense"]
    want_mlp = target * layer_dense - attn_kept(heads)
    channels = round((want_mlp - s["mlp_fixed"]) / s["per_channel"])
    channels = max(1, min(s["inter"], channels))
    layer_kept = attn_kept(heads) + s["mlp_fixed"] + channels * s["per_channel"]
    n_layers = len(shapes)
    if abs(layer_kept / layer_dense - target) > 0.01:  # e.g. below the floor set by keeping every KV head
        warnings.warn(f"kept block fraction {layer_kept / layer_dense:.4f} is as close to {target} as whole "
                      f"heads / channels allow (KV heads are all kept)", stacklevel=2)
    return heads, channels, n_layers * layer_kept, n_layers * layer_dense


def _accumulate_taylor_grads(model, calibration_ids: torch.LongTensor, batch_size: int) -> None:
    """Sum of the gradients of the mean next-token loss of each batch (every batch weighted by its token count)."""
    n_tokens_total = calibration_ids.shape[0] * (calibration_ids.shape[1] - 1)
    device = next(model.parameters()).device
    for start in range(0, calibration_ids.shape[0], batch_size):
        ids = calibration_ids[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        (loss / n_tokens_total).backward()
        del logits, loss


def _keep_only(group, wanted: dict) -> "tp.dependency.Group":
    """A copy of `group` holding only the items whose (module, is_out_pruning) is in `wanted` (module -> is_out)."""
    DG = group._DG
    kept = tp.dependency.Group()
    kept._DG = DG
    seen = set()
    for item in group.items:
        mod = item.dep.target.module
        if mod in wanted and DG.is_out_channel_pruning_fn(item.dep.handler) == wanted[mod]:
            kept._group.append(item)
            seen.add(mod)
    missing = [DG._module2name.get(m, m) for m in wanted if m not in seen]
    if missing:
        raise RuntimeError(f"torch-pruning's group lacks {missing}; its dependency graph changed")
    return kept


def _check_identity(group, n: int) -> None:
    """Every kept item must address the same channels as the root (no reshaping between q-out and o-in)."""
    for item in group.items:
        if list(item.idxs) != list(item.root_idxs) or len(item.idxs) != n:
            raise RuntimeError(f"unexpected index mapping in torch-pruning's group for {item.dep}")


def _plan_global(scores: list[tuple[torch.Tensor, torch.Tensor]], s: dict, n_layers: int,
                 target_block_fraction_kept: float) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Global Taylor pruning: one ranking of every removable unit of every layer by Taylor score per parameter
    (the estimated loss increase per parameter saved), removed cheapest first until the kept block parameters
    reach the target. A head unit is one query head from each KV group (the worst of each), since HF attention
    needs equal query heads per KV group; every layer keeps at least one such unit and one MLP channel."""
    n_q, n_kv = s["n_q"], s["n_kv"]
    per_group = n_q // n_kv
    units = []  # (score per parameter, layer, kind, the indices this unit removes)
    for layer, (head_score, channel_score) in enumerate(scores):
        ranked = [torch.argsort(head_score[g * per_group:(g + 1) * per_group]) + g * per_group for g in range(n_kv)]
        for depth in range(per_group - 1):
            heads = [int(order[depth]) for order in ranked]
            units.append((float(head_score[heads].sum()) / (n_kv * s["per_head"]), layer, "heads", heads))
        for channel in torch.argsort(channel_score)[:-1].tolist():
            units.append((float(channel_score[channel]) / s["per_channel"], layer, "channel", [channel]))
    units.sort(key=lambda unit: unit[0])
    dense = n_layers * (s["attn_dense"] + s["mlp_dense"])
    kept, target = dense, target_block_fraction_kept * dense
    plans = [([], []) for _ in range(n_layers)]
    for _, layer, kind, indices in units:  # within a layer a cheaper unit always comes first
        size = n_kv * s["per_head"] if kind == "heads" else s["per_channel"]
        if kept - size < target:
            continue  # a smaller unit may still fit
        plans[layer][0 if kind == "heads" else 1].extend(indices)
        kept -= size
    return [(sorted(h), sorted(c)) for h, c in plans], kept


def prune_uniform_taylor(model, calibration_ids: torch.LongTensor, target_block_fraction_kept: float,
                         batch_size: int = 4) -> dict:
    """torch-pruning Taylor, the same number of heads and channels kept in every layer (see prune_taylor)."""
    return prune_taylor(model, calibration_ids, target_block_fraction_kept, batch_size, scope="uniform")


def prune_taylor(
    model, calibration_ids: torch.LongTensor, target_block_fraction_kept: float, batch_size: int = 4,
    scope: str = "uniform",
) -> dict:
    """Prune an HF Llama IN PLACE with torch-pruning's Taylor importance: `scope="uniform"` keeps the same
    heads/channels per layer; `scope="global"` ranks all units of all layers together (_plan_global).

    `calibration_ids`: (n, seq_len) int64 token rows; the causal-LM loss on them gives the Taylor gradients.
    Returns {"kept_block_params", "dense_block_params", "heads_per_layer", "channels_per_layer",
    "kept_fraction"} (per-layer lists of query heads / MLP channels kept).
    """
    if scope not in ("uniform", "global"):
        raise ValueError(f"scope must be uniform or global, got {scope!r}")
    heads, channels, planned_kept, dense = plan_uniform(model, target_block_fraction_kept)
    assert _count(block_linears(model)) == dense
    layers = list(model.model.layers)
    s = _layer_shape(layers[0])
    head_dim, n_q, n_kv, inter = s["head_dim"], s["n_q"], s["n_kv"], s["inter"]

    was_training = model.training
    model.eval()  # no dropout in the scores
    saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # by name: slicing swaps tensors
    linears = block_linears(model)
    try:
        DG = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=calibration_ids[:1, : min(16, calibration_ids.shape[1])].to(next(model.parameters()).device),
            forward_fn=lambda m, x: m(x, use_cache=False).logits,
            verbose=False,
        )
        # gradients for the block linears only (the tied embedding / lm_head is never scored)
        for p in model.parameters():
            p.requires_grad_(False)
        for mod in linears:
            mod.weight.requires_grad_(True)
            mod.weight.grad = None
        _accumulate_taylor_grads(model, calibration_ids, batch_size)

        importance = tp.importance.GroupTaylorImportance()  # |w * grad| per channel, mean over the group's layers
        scores = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            full = _keep_only(
                DG.get_pruning_group(a.q_proj, tp.prune_linear_out_channels, list(range(n_q * head_dim))),
                {a.q_proj: True, a.o_proj: False},
            )
            _check_identity(full, n_q * head_dim)
            head_score = importance(full).view(n_q, head_dim).sum(1)
            full = _keep_only(
                DG.get_pruning_group(m.gate_proj, tp.prune_linear_out_channels, list(range(inter))),
                {m.gate_proj: True, m.up_proj: True, m.down_proj: False},
            )
            _check_identity(full, inter)
            scores.append((head_score, importance(full)))
        if scope == "global":
            plans, planned_kept = _plan_global(scores, s, len(layers), target_block_fraction_kept)
        else:
            plans = []
            per_group, keep_per_group = n_q // n_kv, heads // n_kv
            for head_score, channel_score in scores:
                drop_heads = []
                for g in range(n_kv):  # KV head g serves query heads [g * per_group, (g + 1) * per_group)
                    worst = torch.argsort(head_score[g * per_group : (g + 1) * per_group])[: per_group - keep_per_group]
                    drop_heads += sorted(int(i) + g * per_group for i in worst)
                drop_channels = sorted(int(i) for i in torch.argsort(channel_score)[: inter - channels])
                plans.append((drop_heads, drop_channels))

        for layer, (drop_heads, drop_channels) in zip(layers, plans):
            a, m = layer.self_attn, layer.mlp
            if drop_heads:
                idxs = [h * head_dim + d for h in drop_heads for d in range(head_dim)]
                _keep_only(
                    DG.get_pruning_group(a.q_proj, tp.prune_linear_out_channels, idxs),
                    {a.q_proj: True, a.o_proj: False},
                ).prune()
            if drop_channels:
                _keep_only(
                    DG.get_pruning_group(m.gate_proj, tp.prune_linear_out_channels, drop_channels),
                    {m.gate_proj: True, m.up_proj: True, m.down_proj: False},
                ).prune()
            # the model must run: GQA repetition follows the new query head count
            a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
        del DG
    finally:
        for p in model.parameters():
            p.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(saved_requires_grad.get(n, True))
        model.train(was_training)

    kept = _count(block_linears(model))
    if kept != planned_kept:
        raise RuntimeError(f"kept {kept} block params, planned {planned_kept}")
    return {
        "kept_block_params": kept,
        "dense_block_params": dense,
        "heads_per_layer": [layer.self_attn.q_proj.out_features // head_dim for layer in layers],
        "channels_per_layer": [layer.mlp.gate_proj.out_features for layer in layers],
        "kept_fraction": kept / dense,
    }


def prune(model, calibration_ids: torch.LongTensor, kept_fraction: float, *, scope: str = "uniform",
          batch_size: int = 4):
    """The bench.peers signature: prune_taylor at `scope`, as a PeerResult (kept units: the query heads and MLP
    channels left, as counts only; torch-pruning does not report which)."""
    from bench.peers import PeerResult

    start = time.perf_counter()
    result = prune_taylor(model, calibration_ids, kept_fraction, batch_size, scope=scope)
    return PeerResult(result["kept_block_params"], result["dense_block_params"], time.perf_counter() - start,
                      details={"query_heads_per_layer": result["heads_per_layer"],
                               "channels_per_layer": result["channels_per_layer"]})
