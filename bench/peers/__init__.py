"""The peers a user would pick instead of darwinlm, each written here from its paper, behind one signature:

    prune(model, calibration_ids, kept_fraction, **options) -> PeerResult

`model` (a dense HF causal LM of a registered family) is pruned IN PLACE, physically shrunk (query heads, KV heads
and MLP channels sliced; a module pruned to nothing becomes darwinlm's ZeroAttention / ZeroMLP), so that darwinlm's
evaluation, post-training and export take it as they take darwinlm's own models. `calibration_ids` (n, seq_len)
int64 are darwinlm's calibration rows. `kept_fraction` is of the block parameters darwinlm's Budget counts (q, k,
v, o, gate, up, down of every layer; surgery.block_params), and every peer lands within LANDING_TOLERANCE of it.
GQA: query heads are removed evenly within KV groups (a KV head goes once its group is empty), as darwinlm's
database does with even KV groups. Embeddings and the LM head (tied or not) are never touched.

| peer | module | what it is |
|---|---|---|
| tp_taylor_uniform, tp_global | torch_pruning | torch-pruning's Taylor importance, uniform or global |
| wanda_sp | wanda_sp | |W|·‖x‖ per head / channel, the same ratio in every layer, no update |
| flap | flap | fluctuation Var(x)·‖W_j‖², standardised, ranked globally, bias compensation |
| shortgpt | shortgpt | whole blocks of least Block Influence removed |
| slimgpt | slimgpt | structured OBS layer by layer on pruned inputs, log-increasing ratios |
| ziplm_dp | ziplm_dp | darwinlm's database + the budget-exact DP over its stored errors |
Each module's docstring says where it departs from its paper.
"""

import importlib
from dataclasses import dataclass, field

LANDING_TOLERANCE = 0.005  # of the target kept block parameters

# headline method name → (module under bench.peers, options its prune() takes)
PEER_METHODS = {
    "tp_taylor_uniform": ("torch_pruning", {"scope": "uniform"}),
    "tp_global": ("torch_pruning", {"scope": "global"}),
    "flap": ("flap", {}),
    "slimgpt": ("slimgpt", {}),
    "ziplm_dp": ("ziplm_dp", {}),
    "shortgpt": ("shortgpt", {}),
    "wanda_sp": ("wanda_sp", {}),
}


@dataclass
class PeerResult:
    """What a peer did. kept_units[(layer, kind)]: the query heads ("attn") or MLP channels ("mlp") kept, ascending
    indices into the dense module (empty: the module is removed)."""

    kept_block_params: int
    dense_block_params: int
    wall_s: float
    kept_units: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.kept_block_params / self.dense_block_params


def prune_with(method: str, model, calibration_ids, kept_fraction: float, **options) -> PeerResult:
    """Run the peer behind headline method `method` (a PEER_METHODS name) with its fixed options plus `options`."""
    if method not in PEER_METHODS:
        raise ValueError(f"unknown peer {method!r}: one of {', '.join(PEER_METHODS)}")
    module, fixed = PEER_METHODS[method]
    prune = importlib.import_module(f"bench.peers.{module}").prune
    return prune(model, calibration_ids, kept_fraction, **fixed, **options)
