"""The database: every level of every prunable module, pruned once by greedy structured OBS, stored compactly.

Layout under a content-addressed root (any fsspec URI):
    ROOT/layers/007/attn/level_03.safetensors   kept_units (int64) + weight (o_proj columns after OBS)
    ROOT/layers/007/layer.json                  that layer's levels, written after its shards (resume marker)
    ROOT/manifest.json                          written last: the database exists once this exists
Only the output projection changes under OBS, so only it is stored; q/k/v and gate/up rows of kept units are
the base model's own and are sliced from it when a level is applied. Level 0 is the dense module: no shard.
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

import darwinlm.core
from darwinlm.core import uri_io
from darwinlm.core.model.arch import arch_for
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.model.dtypes import DTYPES
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.database.hessians import collect_block_hessians
from darwinlm.core.database.obs import Eligible, ParamsFreed, PrunedWeights, prune_ladder
from darwinlm.core.database.structure import (GQA_MODES, MODULE_KINDS, ModuleShape, check_mlp_alignment,
                                              even_group_ladder, level_ladder, module_shapes)

# 2: each level records its relative output error and each module its output energy (the informed start)
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class DatabaseConfig:
    """How the database is built. Part of its content address: change any field, get a new database."""

    level_steps: int = 10
    relative_damping: float = 0.01
    gqa_mode: str = "query_heads"
    storage_dtype: str = "float16"
    # With gqa_mode "query_heads", rank attention removals by OBS score per parameter freed, so the greedy may
    # complete a KV group (whose last query head also frees its k/v) when that is cheap per parameter. On by
    # default: on SmolLM2 (9 query / 3 KV heads) uniform-50% held-out ppl fell from 91.3 to 76.5 (0.84×, see
    # bench.database's gqa_cost_aware_ppl_ratio). MLP and kv_groups: no effect.
    gqa_cost_aware: bool = True
    # Every MLP level keeps a multiple of this many channels (the full width too: it must divide it). llama.cpp's
    # f16 CPU matmul (tinyBLAS) needs inner dimensions in multiples of 8 and row counts of 4 (16 for its widest
    # tile), and q8_0 stores rows in blocks of 32: on SmolLM2 at half width, widths aligned to 8..256 ran 1.5-1.7x
    # dense prefill, widths of 764 and 767 0.9-1.05x (experiments/2026-12-04-mlp-alignment/note.md). 32 covers
    # both; it moves a 10% level of 1536 channels by at most 16. 1: the plain even steps of databases before.
    mlp_alignment: int = 32
    # With gqa_mode "query_heads", every level removes the same number of query heads from each KV group (levels
    # at 9, 6, 3, 0 heads on SmolLM2's 3 groups of 3), so llama.cpp runs each level without duplicated KV heads
    # or zero-padded query heads, and torch without a per-head KV map. Off: heads one at a time, as before.
    even_kv_groups: bool = True

    def __post_init__(self):
        if self.gqa_mode not in GQA_MODES:
            raise DarwinLMError(f"unknown gqa_mode '{self.gqa_mode}'", f"use one of {', '.join(GQA_MODES)}")
        if self.storage_dtype not in DTYPES:
            raise DarwinLMError(f"unknown storage dtype '{self.storage_dtype}'", f"use {', '.join(DTYPES)}")
        if self.level_steps < 1 or self.relative_damping <= 0:
            raise DarwinLMError("level_steps must be ≥ 1 and relative_damping > 0")
        if isinstance(self.mlp_alignment, bool) or not isinstance(self.mlp_alignment, int) or self.mlp_alignment < 1:
            raise DarwinLMError(f"mlp_alignment must be a whole number of channels ≥ 1, got {self.mlp_alignment!r}",
                                "use e.g. 32 (1: no alignment)")

    @classmethod
    def from_manifest(cls, values: dict) -> "DatabaseConfig":
        """The config a manifest records. Options added since a database was built read as the behaviour it was
        built with (BEFORE_OPTIONS), whatever the defaults become."""
        return cls(**{**BEFORE_OPTIONS, **values})

    def address_values(self) -> dict:
        """The fields that enter content addresses. An added option only when it differs from the behaviour
        before it existed: then it builds the same bytes, so databases (and runs) cached then keep their
        addresses."""
        values = asdict(self)
        for name, before in BEFORE_OPTIONS.items():
            if values[name] == before:
                del values[name]
        return values


# Options added to DatabaseConfig after databases were built, each with the value that builds what was built
# before it existed.
BEFORE_OPTIONS = {"gqa_cost_aware": False, "mlp_alignment": 1, "even_kv_groups": False}


def code_version() -> str:
    return f"darwinlm-{darwinlm.core.__version__}/db-schema-{SCHEMA_VERSION}"


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and bytes (the model's content identity)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def database_root(base_uri: str, base_model_digest: str, calibration_digest: str, config: DatabaseConfig) -> str:
    """Content address: same model, calibration, config and code → same root, so a finished build is reused."""
    key = json.dumps([base_model_digest, calibration_digest, config.address_values(), code_version()], sort_keys=True)
    return uri_io.join(base_uri, hashlib.sha256(key.encode()).hexdigest()[:16])


def manifest_uri(root: str) -> str:
    """The database's manifest: written last, so the database exists once this file does."""
    return uri_io.join(root, "manifest.json")


def layer_record_uri(root: str, layer: int) -> str:
    """A layer's record, written after its shards: the marker a resumed build skips the layer by."""
    return uri_io.join(root, f"layers/{layer:03d}/layer.json")


def _shard_name(layer: int, kind: str, level: int) -> str:
    return f"layers/{layer:03d}/{kind}/level_{level:02d}.safetensors"


def greedy_params_freed(shape: ModuleShape, config: DatabaseConfig) -> ParamsFreed | None:
    """What the greedy divides each unit's OBS score by in this module, or None to rank by score alone.

    Only attention over query heads: there a unit's cost depends on what is already removed (a KV group's last
    head frees k/v too). MLP channels and whole KV groups all cost the same, so dividing would only perturb
    rounding; they keep the plain order, bit for bit. So do heads under even KV groups: the heads a round may
    remove all free the same count (in the last round, each its group's k/v too)."""
    if (config.gqa_cost_aware and shape.kind == "attn" and shape.gqa_mode == "query_heads"
            and not keeps_kv_groups_even(shape, config)):
        return shape.params_freed
    return None


def keeps_kv_groups_even(shape: ModuleShape, config: DatabaseConfig) -> bool:
    """Whether this module's levels remove query heads evenly from every KV group (see `even_kv_groups`). Plain
    multi-head attention (one head per group) and whole KV groups are even anyway."""
    return (config.even_kv_groups and shape.kind == "attn" and shape.gqa_mode == "query_heads"
            and shape.layout.group_size > 1)


def greedy_eligible(shape: ModuleShape, config: DatabaseConfig) -> Eligible | None:
    """Which units the greedy may remove next in this module, or None for any."""
    return shape.heads_of_groups_behind if keeps_kv_groups_even(shape, config) else None


def module_ladder(shape: ModuleShape, config: DatabaseConfig) -> list[int]:
    """Units removed at each level of one module: even steps, MLP widths aligned, KV groups kept even."""
    if shape.kind == "mlp":
        return level_ladder(shape.n_units, config.level_steps, config.mlp_alignment)
    if keeps_kv_groups_even(shape, config):
        return even_group_ladder(shape.layout, config.level_steps)
    return level_ladder(shape.n_units, config.level_steps)


def _prune_module(weight, hessian, shape: ModuleShape, config: DatabaseConfig
                  ) -> tuple[list[PrunedWeights], list[float], float]:
    """(levels, their relative errors, output energy) of one module: see `prune_ladder`."""
    return prune_ladder(weight, hessian, shape.unit_size, module_ladder(shape, config), config.relative_damping,
                        greedy_params_freed(shape, config), greedy_eligible(shape, config))


def _write_module(root: str, layer: int, shape: ModuleShape, levels: list[PrunedWeights], errors: list[float],
                  energy: float, *, dtype) -> dict:
    """Write one shard per level above 0; return the module's manifest entry."""
    records = []
    for level, pruned in enumerate(levels):
        record = {"level": level, "units_removed": pruned.units_removed, "params": shape.params_kept(pruned.kept_units),
                  "error": errors[level]}
        if level > 0:
            data = save_safetensors({"kept_units": pruned.kept_units, "weight": pruned.weight.to(dtype).contiguous()})
            record.update(shard=_shard_name(layer, shape.kind, level), sha256=uri_io.sha256(data))
            uri_io.write_bytes(uri_io.join(root, record["shard"]), data)
        records.append(record)
    return {"layer": layer, "kind": shape.kind, "n_units": shape.n_units, "unit_size": shape.unit_size,
            "output_energy": energy, "levels": records}


class DatabaseBuilder:
    """A database build, one layer at a time, so that an orchestrator can make each layer its own resumable step.

    Layers are built in order. A layer whose layer.json exists is not pruned again; the driver only walks the
    dense block to reach the next one (that walk is the whole cost of resuming at layer i in a new process).
    `finish()` writes the manifest, after checking that every layer is there.

    With `overlap` (the default), the single-threaded OBS of layer i runs in a worker thread while this thread
    walks block i+1 and collects its Hessians (torch releases the GIL), so `build_layer(i + 1)` starts with its
    Hessians ready. `build_layer(i)` still returns only once layer i's shards and layer.json are written, and
    the worker runs the same operations with the same thread count, so the bytes are those of a sequential build.
    """

    def __init__(self, model, calibration_ids: torch.Tensor, base_uri: str, *, calibration_digest: str,
                 config: DatabaseConfig = DatabaseConfig(), batch_size: int = 8,
                 base_model_digest: str | None = None, overlap: bool = True):
        self.model, self.calibration_ids, self.config, self.batch_size = model, calibration_ids, config, batch_size
        self.calibration_digest = calibration_digest
        self.base_model_digest = base_model_digest or model_digest(model)
        self.root = database_root(base_uri, self.base_model_digest, calibration_digest, config)
        self.spec = arch_for(model)
        self.shapes = module_shapes(model, self.spec, config.gqa_mode)
        for layer, shapes in enumerate(self.shapes):
            check_mlp_alignment(config.mlp_alignment, shapes["mlp"].n_units, layer)
        self.num_layers = len(self.spec.block_list(model))
        self.overlap = overlap
        self._driver: BlockDriver | None = None  # made on first need: it holds every row's activations
        self._ahead: tuple[int, dict] | None = None  # (layer, {kind: Hessian}) collected while the worker pruned
        self._worker: ThreadPoolExecutor | None = None

    @property
    def finished(self) -> bool:
        return uri_io.exists(manifest_uri(self.root))

    def _record_uri(self, layer: int) -> str:
        return layer_record_uri(self.root, layer)

    def layer_done(self, layer: int) -> bool:
        return uri_io.exists(self._record_uri(layer))

    def build_layer(self, layer: int) -> list[dict]:
        """Prune both modules of `layer` at every level and write them (layer.json last); returns its records.
        A layer already written is read back instead."""
        if not 0 <= layer < self.num_layers:
            raise DarwinLMError(f"layer {layer} out of range: the model has {self.num_layers}")
        with uri_io.lock(uri_io.join(self.root, "locks", f"layer-{layer:03d}.lock")):
            # under the lock: a concurrent build of the same database may have just written this layer
            if self.layer_done(layer):
                return json.loads(uri_io.read_bytes(self._record_uri(layer)))
            return self._build_layer(layer)

    def _build_layer(self, layer: int) -> list[dict]:
        hessians = self._hessians(layer)
        block = self._driver.blocks[layer]
        weights = {kind: _output_projection(block, self.spec, kind).weight.detach() for kind in MODULE_KINDS}
        if self.overlap and layer + 1 < self.num_layers and not self.layer_done(layer + 1):
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="darwinlm-obs")
            pruning = self._worker.submit(self._prune_and_write, layer, weights, hessians, torch.get_num_threads())
            try:
                self._ahead = (layer + 1, self._collect(layer + 1))
            finally:
                modules = pruning.result()  # waits (and re-raises) even if the walk ahead failed
            return modules
        return self._prune_and_write(layer, weights, hessians, torch.get_num_threads())

    def _hessians(self, layer: int) -> dict[str, torch.Tensor]:
        """{kind: H} of `layer`: collected ahead by the previous build_layer, or by walking there now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == layer:
            return ahead[1]
        if self._driver is None:
            self._driver = BlockDriver(self.model, self.calibration_ids, batch_size=self.batch_size)
        if self._driver.position > layer:
            raise DarwinLMError(f"layer {layer} was walked past without being written",
                                "build layers in order, or start a new DatabaseBuilder")
        while self._driver.position < layer:
            self._driver.advance()  # a layer built earlier (or by another process): walk it without Hessians
        return self._collect(layer)

    def _collect(self, layer: int) -> dict[str, torch.Tensor]:
        """Run block `layer` (the driver's next) and return the Hessians of its output projections' inputs."""
        with collect_block_hessians(self._driver.blocks[layer], self.spec) as accumulators:
            self._driver.advance()
        return {kind: accumulators[kind].hessian() for kind in MODULE_KINDS}

    def _prune_and_write(self, layer: int, weights: dict, hessians: dict, threads: int) -> list[dict]:
        """Prune both modules of `layer` and write their shards, then layer.json; returns its records. Runs in the
        worker thread when overlapping (the shard writes, encoding and hashing, then overlap the walk too), with
        the caller's thread count (OpenMP's is per thread: the inverse's and energy's bits depend on it), so both
        paths compute the same bits."""
        torch.set_num_threads(threads)
        dtype = DTYPES[self.config.storage_dtype]
        modules = []
        for kind in MODULE_KINDS:
            shape = self.shapes[layer][kind]
            pruned = _prune_module(weights[kind], hessians[kind], shape, self.config)
            modules.append(_write_module(self.root, layer, shape, *pruned, dtype=dtype))
        uri_io.write_bytes(self._record_uri(layer), json.dumps(modules).encode())
        return modules

    def finish(self) -> "Database":
        """Write the manifest (last: the database exists once it does) and open the database."""
        if self.finished:
            return Database.open(self.root)
        missing = [layer for layer in range(self.num_layers) if not self.layer_done(layer)]
        if missing:
            raise DarwinLMError(f"database at {self.root} lacks layers {missing}", "build them before finishing")
        self._driver, self._ahead = None, None  # frees the activations
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        layer_records = [json.loads(uri_io.read_bytes(self._record_uri(layer))) for layer in range(self.num_layers)]
        config = self.model.config
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "code_version": code_version(),
            "base_model": {"digest": self.base_model_digest, "model_type": config.model_type,
                           "num_layers": self.num_layers, "hidden_size": config.hidden_size,
                           "head_layout": asdict(self.spec.head_layout(config))},
            "calibration": {"digest": self.calibration_digest, "rows": int(self.calibration_ids.shape[0]),
                            "seq_len": int(self.calibration_ids.shape[1])},
            "config": asdict(self.config),
            "dense_params": sum(s.dense_params() for layer in self.shapes for s in layer.values()),
            "modules": [module for modules in layer_records for module in modules],
        }
        uri_io.write_bytes(manifest_uri(self.root), json.dumps(manifest, indent=1).encode())
        return Database.open(self.root)


def build_database(
    model,
    calibration_ids: torch.Tensor,
    base_uri: str,
    *,
    calibration_digest: str,
    config: DatabaseConfig = DatabaseConfig(),
    batch_size: int = 8,
    base_model_digest: str | None = None,
    progress: bool = False,
    overlap: bool = True,
) -> "Database":
    """Build (or reuse, or resume per layer) the database of `model` on calibration rows (n_rows, seq_len) int64.
    `overlap=False` prunes each layer before walking the next (same bytes, slower)."""
    builder = DatabaseBuilder(model, calibration_ids, base_uri, calibration_digest=calibration_digest,
                              config=config, batch_size=batch_size, base_model_digest=base_model_digest,
                              overlap=overlap)
    if builder.finished:
        return Database.open(builder.root)
    for layer in tqdm(range(builder.num_layers), desc="database", unit="layer", disable=not progress):
        builder.build_layer(layer)
    return builder.finish()


def _output_projection(block, spec, kind: str):
    if kind == "attn":
        return spec.attention_of(block).get_submodule(spec.o_proj)
    return spec.mlp_of(block).get_submodule(spec.down_proj)


class Database:
    """A built database, opened from its root URI. Shards are read (and hash-checked) one at a time, on demand."""

    def __init__(self, root: str, manifest: dict):
        self.root = root
        self.manifest = manifest
        self._modules = {(m["layer"], m["kind"]): m for m in manifest["modules"]}
        self._cache: dict[tuple[int, str, int], PrunedWeights] = {}

    @classmethod
    def open(cls, root: str) -> "Database":
        manifest_at = manifest_uri(root)
        if not uri_io.exists(manifest_at):
            raise DarwinLMError(f"no database at {root} (manifest.json missing)", "build it first, or fix the path")
        try:
            manifest = json.loads(uri_io.read_bytes(manifest_at))
        except ValueError as error:
            raise DarwinLMError(f"corrupted database manifest at {manifest_at}", "delete the folder and rebuild") from error
        if manifest.get("code_version") != code_version():
            raise DarwinLMError(
                f"database at {root} was built by {manifest.get('code_version')}, this is {code_version()}",
                "rebuild the database with this version",
            )
        return cls(root, manifest)

    @property
    def config(self) -> DatabaseConfig:
        """How this database was built (options added since read as their value before they existed)."""
        return DatabaseConfig.from_manifest(self.manifest["config"])

    @property
    def digest(self) -> str:
        """Identity of the database content: its root's content address."""
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def check_model(self, model, digest: str | None = None) -> None:
        """Refuse to apply this database to a model other than the one it was built from."""
        digest = digest or model_digest(model)
        if digest != self.manifest["base_model"]["digest"]:
            raise DarwinLMError(
                f"database at {self.root} was built from another model (digest "
                f"{self.manifest['base_model']['digest'][:12]}, this model {digest[:12]})",
                "build a database for this model",
            )

    def module(self, layer: int, kind: str) -> dict:
        if (layer, kind) not in self._modules:
            raise DarwinLMError(f"database has no module ({layer}, {kind})", "check the layer index and kind")
        return self._modules[(layer, kind)]

    def num_levels(self, layer: int, kind: str) -> int:
        return len(self.module(layer, kind)["levels"])

    def params(self, layer: int, kind: str, level: int) -> int:
        return self.module(layer, kind)["levels"][level]["params"]

    def error(self, layer: int, kind: str, level: int) -> float:
        """Relative output error of one level on the calibration data (0 at level 0, 1 with all removed)."""
        return self.module(layer, kind)["levels"][level]["error"]

    def load(self, layer: int, kind: str, level: int) -> PrunedWeights:
        """Kept units and OBS-updated output-projection columns of one level (level ≥ 1), hash-checked."""
        key = (layer, kind, level)
        if key not in self._cache:
            levels = self.module(layer, kind)["levels"]
            if not 1 <= level < len(levels):
                raise DarwinLMError(f"level {level} out of range for ({layer}, {kind}): 1..{len(levels) - 1} are stored")
            record = levels[level]
            uri = uri_io.join(self.root, record["shard"])
            if not uri_io.exists(uri):
                raise DarwinLMError(f"database shard missing: {uri}", "rebuild the database")
            data = uri_io.read_bytes(uri)
            if uri_io.sha256(data) != record["sha256"]:
                raise DarwinLMError(f"database shard corrupted (hash mismatch): {uri}", "rebuild the database")
            tensors = load_safetensors(data)
            self._cache[key] = PrunedWeights(record["units_removed"], tensors["kept_units"], tensors["weight"])
        return self._cache[key]
