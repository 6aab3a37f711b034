"""Refit of a chosen genome: OBS at its levels only, each module fitted on inputs from the pruned layers below.

Every database level is fitted on the *dense* model's inputs (a multi-level database must be: it cannot know
which levels the layers below will take). Once a genome is chosen, SparseGPT/GPTQ's sequential recipe applies:
walk the blocks with the one driver, and in block i
  1. collect the Hessian of o_proj's inputs (the block's inputs come from the pruned, refitted blocks below);
     refit attention at its level and install it;
  2. collect the Hessian of down_proj's inputs, which now sees the pruned attention's output; refit the MLP;
  3. advance the activations through the pruned block.
The target blends two (`dense_weight` w):
  * w = 0, "propagated" (SparseGPT/GPTQ): the dense weights on the propagated inputs, ‖W X − Ŵ X_S‖². Each
    module fixes only its own pruning; the error the layers below left in its inputs passes through.
  * w = 1, "dense" (asymmetric, as in GPTAQ): the dense model's own output of the module, ‖W X_d − Ŵ X_S‖²,
    where X_d are the module's inputs in the dense model over the same tokens (a second driver walks the dense
    blocks beside the pruned ones). Each module then also makes up for what the layers below lost.
  * in between, the target inputs X + w (X_d − X). Measured on SmolLM2 at uniform 50% (bench.database), the
    full dense target is far worse than either, on calibration text too: X is a noisy view of X_d, and a least-
    squares fit through noisy inputs shrinks its outputs (regression dilution), which compounds over 30 blocks.
    A partial pull avoids most of the shrinkage and keeps most of the correction.
With H = X Xᵀ, G = X_d Xᵀ (both 2/n-scaled) and G_w = (1 − w) H + w G, the fit is Ŵ_S = W G_w[:, S] H[S, S]⁻¹.
H is damped as the database damps it, and G_w gets the same added diagonal, so the damping pulls Ŵ towards W
(and identical streams, G = H, still give Ŵ = W at level 0).

The units removed stay the database's (the structure the greedy chose on dense inputs, so shapes and parameter
counts are exactly those of the level); only the kept columns are refitted, in closed form. With the
propagated target, Ŵ_S = W H[:, S] H[S, S]⁻¹ is what greedy OBS leaves after removing the complement of S,
the order of removals notwithstanding.
`reselect=True` instead re-runs the greedy on the propagated Hessian, ranking units as the database's build
did (gqa_cost_aware, even_kv_groups), and keeps its choice only where it leaves the module's parameter count unchanged:
bench.database measures both.

While the refit runs, the model's o_proj/down_proj weights are overwritten in place with the refitted ones at
dense width (zeros in removed columns: the same function as the shrunk module); they are restored on return.
"""

import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from darwinlm.core.database.store import Database, greedy_eligible, greedy_params_freed
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.model.dtypes import DTYPES
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.database.hessians import HessianAccumulator
from darwinlm.core.database.obs import PrunedWeights, dampen, greedy_prune, inverse_hessian
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
             relative_damping: float, cross: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares weights on the kept columns S: W G[:, S] H[S, S]⁻¹, H damped as the database damps it and G
    (the target inputs' cross moment with the propagated ones; default H, the propagated target) given the same
    added diagonal.

    weight: (d_out, d_in) dense; hessian, cross: (d_in, d_in) undamped; kept_units: (n_kept,) int64 ascending.
    Returns (d_out, n_kept * unit_size) float32. Solved in float64 through Cholesky.
    """
    hessian = hessian.double()
    damped = dampen(hessian, relative_damping)
    target = damped if cross is None else cross.double() + torch.diag(damped.diagonal() - hessian.diagonal())
    columns = unit_columns(kept_units, unit_size)
    right = weight.double() @ target[:, columns]  # (d_out, |S|)
    factor = torch.linalg.cholesky(damped[columns][:, columns])
    return torch.cholesky_solve(right.T, factor).T.float()


class InputMoments:
    """Second moments of one linear's inputs over the calibration tokens, in the order the driver feeds them.

    Always H = 2/n Σ x xᵀ of the propagated inputs x. Given `dense_inputs` (n, d_in), the same linear's inputs
    in the dense model, row for row, also G = 2/n Σ x_d xᵀ and D = 2/n Σ x_d x_dᵀ.
    """

    def __init__(self, d_in: int, dense_inputs: torch.Tensor | None = None, device=None):
        self.propagated = HessianAccumulator(d_in, device)
        self.dense_inputs = dense_inputs
        self.cross_sum = None if dense_inputs is None else torch.zeros(d_in, d_in, device=device)
        self.offset = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        self.propagated.add(rows)
        if self.cross_sum is not None:
            dense = self.dense_inputs[self.offset : self.offset + rows.shape[0]]
            if dense.shape[0] != rows.shape[0]:
                raise RuntimeError("the dense and propagated streams fed different numbers of tokens")
            self.cross_sum.addmm_(dense.T, rows)
        self.offset += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.propagated.hessian()

    def blended(self, dense_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H, G_w, D_w) in float64 for target inputs t = x + w (x_d − x): G_w = 2/n Σ t xᵀ, D_w = 2/n Σ t tᵀ."""
        h = self.hessian().double()
        if dense_weight == 0:
            return h, h, h
        if self.cross_sum is None:
            raise RuntimeError("a dense weight above 0 needs the dense inputs")
        if self.offset != self.dense_inputs.shape[0]:
            raise RuntimeError(f"{self.offset} propagated tokens against {self.dense_inputs.shape[0]} dense ones")
        g = self.cross_sum.double() * (2.0 / self.offset)
        dense = HessianAccumulator(self.dense_inputs.shape[1], self.dense_inputs.device)
        dense.add(self.dense_inputs)
        d, w = dense.hessian().double(), dense_weight
        return h, (1 - w) * h + w * g, (1 - w) ** 2 * h + w * (1 - w) * (g + g.T) + w**2 * d


@contextmanager
def collect_input_moments(linear: nn.Linear, dense_inputs: torch.Tensor | None = None):
    """While open, every forward of `linear` adds its inputs to the yielded InputMoments."""
    moments = InputMoments(linear.in_features, dense_inputs, linear.weight.device)
    handle = linear.register_forward_pre_hook(lambda _m, args: moments.add(args[0]))
    try:
        yield moments
    finally:
        handle.remove()


@contextmanager
def capture_inputs(linears: dict[str, nn.Linear]):
    """While open, every forward of each linear appends its inputs, flattened to (tokens, d_in) float32, to
    the yielded {kind: list}."""
    captured = {kind: [] for kind in linears}
    handles = [linear.register_forward_pre_hook(
                   lambda _m, args, into=captured[kind]: into.append(args[0].reshape(-1, args[0].shape[-1]).float()))
               for kind, linear in linears.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _relative_error(weight, moments: tuple, pruned: PrunedWeights, unit_size: int) -> float:
    """‖W T − Ŵ X‖² / ‖W T‖² from the moments (H, G, D) = (X Xᵀ, T Xᵀ, T Tᵀ) of target inputs T, in float64."""
    full = torch.zeros_like(weight, dtype=torch.float64)
    full[:, unit_columns(pruned.kept_units, unit_size)] = pruned.weight.double()
    w = weight.double()
    h, g, d = (m.double() for m in moments)
    energy = float(((w @ d) * w).sum())
    error = energy - 2 * float(((w @ g) * full).sum()) + float(((full @ h) * full).sum())
    return max(error, 0.0) / energy if energy > 0 else 0.0


def _refit_module(weight, moments: InputMoments, database: Database, layer: int, shape: ModuleShape, level: int, *,
                  reselect: bool, dense_weight: float, dtype) -> tuple[PrunedWeights, tuple[float, float]]:
    """The refitted PrunedWeights of one module at `level`, and the (database, refit) relative errors against its
    target."""
    kind = shape.kind
    module = database.module(layer, kind)
    unit_size, damping = module["unit_size"], database.manifest["config"]["relative_damping"]
    blended = moments.blended(dense_weight)
    hessian = blended[0].float()
    if level == 0:
        reference = PrunedWeights(0, torch.arange(module["n_units"]), weight.to(dtype))
    else:
        reference = database.load(layer, kind, level)
    kept = reference.kept_units
    if reselect and level > 0:
        config = database.config
        chosen = greedy_prune(weight, inverse_hessian(hessian, damping), unit_size, [reference.units_removed],
                              greedy_params_freed(shape, config), greedy_eligible(shape, config))[0]
        kept = chosen.kept_units if shape.params_kept(chosen.kept_units) == shape.params_kept(kept) else kept
    refit = PrunedWeights(reference.units_removed, kept,
                          fit_kept(weight, hessian, kept, unit_size, damping,
                                   None if dense_weight == 0 else blended[1]).to(dtype))
    errors = (_relative_error(weight, blended, reference, unit_size),
              _relative_error(weight, blended, refit, unit_size))
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
                 dense_weight: float = 0.0, base_model_digest: str | None = None) -> RefitResult:
    """Refit every module of `levels` ({(layer, kind): level}, a Genome's assignment) on propagated inputs,
    towards the target `dense_weight` sets (0: propagated, 1: dense; see the module docstring).

    model: the dense model the database was built from (left dense on return); calibration_ids: (n_rows,
    seq_len) int64. Returns the refitted weights; `RefitDatabase(database, result)` assembles them.
    """
    if not 0.0 <= dense_weight <= 1.0:
        raise DarwinLMError(f"refit dense_weight {dense_weight} is outside [0, 1]",
                            "use 0 for the propagated target, 1 for the dense model's outputs, or a blend")
    database.check_model(model, base_model_digest)
    driver = BlockDriver(model, calibration_ids, batch_size=batch_size)
    missing = [(layer, kind) for layer in range(driver.num_blocks) for kind in MODULE_KINDS
               if (layer, kind) not in levels]
    if missing:
        raise DarwinLMError(f"the refit needs a level for every module; missing {missing[:4]}")
    # the dense stream: the same rows through the dense blocks, each walked before its own weights are replaced
    dense_driver = None if dense_weight == 0 else BlockDriver(model, calibration_ids, batch_size=batch_size,
                                                                   block_kwargs=driver.block_kwargs)
    dtype = DTYPES[database.manifest["config"]["storage_dtype"]]
    # the shapes the build pruned with (biases included): reselection ranks and counts units as it did
    shapes = module_shapes(model, driver.spec, database.config.gqa_mode)
    linears = [_output_projection(block, driver.spec, kind) for block in driver.blocks for kind in MODULE_KINDS]
    saved = [(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()) for lin in linears]
    weights, errors = {}, {}
    try:
        for layer, block in enumerate(driver.blocks):
            projections = {kind: _output_projection(block, driver.spec, kind) for kind in MODULE_KINDS}
            dense_inputs = dict.fromkeys(MODULE_KINDS)
            if dense_driver is not None:
                with capture_inputs(projections) as captured:
                    dense_driver.advance()
                dense_inputs = {kind: torch.cat(rows) for kind, rows in captured.items()}
            for kind, linear in projections.items():
                level = levels[(layer, kind)]
                last_level = level == database.num_levels(layer, kind) - 1
                if not last_level:
                    with collect_input_moments(linear, dense_inputs[kind]) as moments:
                        driver.observe(stop_at=linear)
                    weight = linear.weight.detach().float()
                    weights[(layer, kind)], errors[(layer, kind)] = _refit_module(
                        weight, moments, database, layer, shapes[layer][kind], level, reselect=reselect,
                        dense_weight=dense_weight, dtype=dtype)
                _install(linear, weights.get((layer, kind)), database.module(layer, kind)["unit_size"], last_level)
            driver.advance()
    finally:
        with torch.no_grad():
            for linear, (weight, bias) in zip(linears, saved):
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
    return RefitResult(dict(levels), weights, errors)
