"""Refit of a chosen genome: OBS at its levels only, each module fitted on inputs from the pruned layers below.

Every database level is fitted on the *dense* model's inputs (a multi-level database must be: it cannot know
which levels the layers below will take). Once a genome is chosen, SparseGPT/GPTQ's sequential recipe applies:
walk the blocks with the one driver, and in block i
  1. collect the Hessian of o_proj's inputs (the block's inputs come from the pruned, refitted blocks below);
     refit attention at its level and install it;
  2. collect the Hessian of down_proj's inputs, which now sees the pruned attention's output; refit the MLP;
  3. advance the activations through the pruned block.
The target is the dense weights on those inputs, ‖W X − Ŵ X_S‖², with the database's damping.

The units removed stay the database's (the structure the greedy chose on dense inputs, so shapes and parameter
counts are exactly those of the level); only the kept columns are refitted, in closed form:
    Ŵ_S = W H[:, S] H[S, S]⁻¹   (H damped as the database damps it)
which is what greedy OBS leaves after removing the complement of S, the order of removals notwithstanding.
`reselect=True` instead re-runs the greedy on the propagated Hessian, ranking units as the database's build
did (gqa_cost_aware), and keeps its choice only where it leaves the module's parameter count unchanged:
bench.database measures both.

While the refit runs, the model's o_proj/down_proj weights are overwritten in place with the refitted ones at
dense width (zeros in removed columns: the same function as the shrunk module); they are restored on return.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from darwinlm.core.database.store import Database, greedy_params_freed
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.model.dtypes import DTYPES
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.database.hessians import collect_block_hessians
from darwinlm.core.database.obs import PrunedWeights, dampen, greedy_prune, inverse_hessian, reconstruction_error
from darwinlm.core.database.structure import MODULE_KINDS, ModuleShape, module_shapes, unit_columns




@dataclass(frozen=True)
class RefitResult:
    """Refitted output-projection columns per module at its chosen level, and what the refit changed.

    `weights[(layer, kind)]` has the database's kept units and shapes (in the database's storage dtype), for
    every module whose level keeps something; `errors[(layer, kind)]` is (database weights, refitted weights):
    the relative output error ‖WX − ŴX‖² / ‖WX‖² on the propagated calibration inputs.
    """

    levels: dict
    weights: dict
    errors: dict

    def to_bytes(self) -> bytes:
        """safetensors: `L.kind.kept_units` and `L.kind.weight` tensors; levels and errors in the metadata."""
        tensors = {}
        for (layer, kind), pruned in self.weights.items():
            tensors[f"{layer}.{kind}.kept_units"] = pruned.kept_units.contiguous()
            tensors[f"{layer}.{kind}.weight"] = pruned.weight.contiguous()
        meta = {"levels": [[layer, kind, level] for (layer, kind), level in self.levels.items()],
                "removed": [[layer, kind, p.units_removed] for (layer, kind), p in self.weights.items()],
                "errors": [[layer, kind, *pair] for (layer, kind), pair in self.errors.items()]}
        return save_safetensors(tensors, metadata={"refit": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RefitResult":
        tensors = load_safetensors(data)
        header_size = int.from_bytes(data[:8], "little")  # the safetensors layout: u64 size, then a JSON header
        meta = json.loads(json.loads(data[8 : 8 + header_size])["__metadata__"]["refit"])
        weights = {(layer, kind): PrunedWeights(removed, tensors[f"{layer}.{kind}.kept_units"],
                                                tensors[f"{layer}.{kind}.weight"])
                   for layer, kind, removed in meta["removed"]}
        return cls({(layer, kind): level for layer, kind, level in meta["levels"]}, weights,
                   {(layer, kind): (before, after) for layer, kind, before, after in meta["errors"]})


class RefitDatabase(Database):
    """A database whose chosen levels load the refitted weights: LiveAssembly and export apply it unchanged.

    Levels other than the refitted ones (and level 0, which assembly takes from the dense model) load as before.
    """

    def __init__(self, database: Database, refit: RefitResult):
        super().__init__(database.root, database.manifest)
        self.refit = refit
        self._refitted = {(layer, kind, refit.levels[(layer, kind)]): w for (layer, kind), w in refit.weights.items()}

    def load(self, layer: int, kind: str, level: int) -> PrunedWeights:
        if (layer, kind, level) in self._refitted:
            return self._refitted[(layer, kind, level)]
        return super().load(layer, kind, level)


def fit_kept(weight: torch.Tensor, hessian: torch.Tensor, kept_units: torch.Tensor, unit_size: int,
             relative_damping: float) -> torch.Tensor:
    """Least-squares weights on the kept columns S: W H[:, S] H[S, S]⁻¹, H damped as the database damps it.

    weight: (d_out, d_in) dense; hessian: (d_in, d_in) undamped; kept_units: (n_kept,) int64 ascending.
    Returns (d_out, n_kept * unit_size) float32. Solved in float64 through Cholesky.
    """
    damped = dampen(hessian.double(), relative_damping)
    columns = unit_columns(kept_units, unit_size)
    right = weight.double() @ damped[:, columns]  # (d_out, |S|)
    factor = torch.linalg.cholesky(damped[columns][:, columns])
    return torch.cholesky_solve(right.T, factor).T.float()


def _relative_error(weight, hessian, pruned: PrunedWeights, unit_size: int) -> float:
    full = torch.zeros_like(weight)
    full[:, unit_columns(pruned.kept_units, unit_size)] = pruned.weight.float()
    energy = reconstruction_error(weight, torch.zeros_like(weight), hessian)
    return reconstruction_error(weight, full, hessian) / energy if energy > 0 else 0.0


def _refit_module(weight, hessian, database: Database, layer: int, shape: ModuleShape, level: int, *,
                  reselect: bool, dtype) -> tuple[PrunedWeights, tuple[float, float]]:
    """The refitted PrunedWeights of one module at `level`, and (database, refit) relative errors on `hessian`."""
    kind = shape.kind
    module = database.module(layer, kind)
    unit_size, damping = module["unit_size"], database.manifest["config"]["relative_damping"]
    if level == 0:
        reference = PrunedWeights(0, torch.arange(module["n_units"]), weight.to(dtype))
    else:
        reference = database.load(layer, kind, level)
    kept = reference.kept_units
    if reselect and level > 0:
        chosen = greedy_prune(weight, inverse_hessian(hessian, damping), unit_size, [reference.units_removed],
                              greedy_params_freed(shape, database.config))[0]
        kept = chosen.kept_units if shape.params_kept(chosen.kept_units) == shape.params_kept(kept) else kept
    refit = PrunedWeights(reference.units_removed, kept,
                          fit_kept(weight, hessian, kept, unit_size, damping).to(dtype))
    errors = (_relative_error(weight, hessian, reference, unit_size), _relative_error(weight, hessian, refit, unit_size))
    return refit, errors


def _output_projection(block: nn.Module, spec, kind: str) -> nn.Linear:
    if kind == "attn":
        return spec.attention_of(block).get_submodule(spec.o_proj)
    return spec.mlp_of(block).get_submodule(spec.down_proj)


@torch.no_grad()
def _install(linear: nn.Linear, pruned: PrunedWeights, unit_size: int, last_level: bool) -> None:
    """Put the refitted columns into `linear` at dense width (zeros elsewhere); the last level is a zero module."""
    full = torch.zeros_like(linear.weight)
    if not last_level:
        full[:, unit_columns(pruned.kept_units, unit_size).to(full.device)] = pruned.weight.to(full)
    elif linear.bias is not None:
        linear.bias.zero_()  # ZeroAttention / ZeroMLP return zeros, bias included
    linear.weight.copy_(full)


def refit_genome(model: nn.Module, database: Database, levels: Mapping[tuple[int, str], int],
                 calibration_ids: torch.Tensor, *, batch_size: int = 8, reselect: bool = False,
                 base_model_digest: str | None = None) -> RefitResult:
    """Refit every module of `levels` ({(layer, kind): level}, a Genome's assignment) on propagated inputs.

    model: the dense model the database was built from (left dense on return); calibration_ids: (n_rows,
    seq_len) int64. Returns the refitted weights; `RefitDatabase(database, result)` assembles them.
    """
    database.check_model(model, base_model_digest)
    driver = BlockDriver(model, calibration_ids, batch_size=batch_size)
    missing = [(layer, kind) for layer in range(driver.num_blocks) for kind in MODULE_KINDS
               if (layer, kind) not in levels]
    if missing:
        raise DarwinLMError(f"the refit needs a level for every module; missing {missing[:4]}")
    dtype = DTYPES[database.manifest["config"]["storage_dtype"]]
    # the shapes the build pruned with (biases included): reselection ranks and counts units as it did
    shapes = module_shapes(model, driver.spec, database.config.gqa_mode)
    linears = [_output_projection(block, driver.spec, kind) for block in driver.blocks for kind in MODULE_KINDS]
    saved = [(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()) for lin in linears]
    weights, errors = {}, {}
    try:
        for layer, block in enumerate(driver.blocks):
            for kind in MODULE_KINDS:
                level, linear = levels[(layer, kind)], _output_projection(block, driver.spec, kind)
                last_level = level == database.num_levels(layer, kind) - 1
                if not last_level:
                    with collect_block_hessians(block, driver.spec) as accumulators:
                        driver.observe(stop_at=linear)
                    weight = linear.weight.detach().float()
                    weights[(layer, kind)], errors[(layer, kind)] = _refit_module(
                        weight, accumulators[kind].hessian(), database, layer, shapes[layer][kind], level,
                        reselect=reselect, dtype=dtype)
                _install(linear, weights.get((layer, kind)), database.module(layer, kind)["unit_size"], last_level)
            driver.advance()
    finally:
        with torch.no_grad():
            for linear, (weight, bias) in zip(linears, saved):
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
    return RefitResult(dict(levels), weights, errors)
