"""The whole compression's configuration, and presets: YAML files under darwinlm_core/presets/ (darwinlm.core's presets).

A preset names every knob of every stage. Unknown keys are errors (a typo must not silently fall back to a
default), and values are checked by each stage's own dataclass. Every preset file starts with the command
that runs it.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from darwinlm.core.data.prepared import DataConfig
from darwinlm.core.database.store import DatabaseConfig
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.preset_files import PRESET_DIR, preset_names  # noqa: F401 (callers import them from here too)
from darwinlm.core.search.finetune import FinetuneConfig
from darwinlm.core.search.evolution import SearchConfig, StageConfig



@dataclass(frozen=True)
class PostTrainConfig:
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(lr=5e-5, warmup_fraction=0.1,
                                                                            cosine=True, distill_weight=0.5))
    # Before finetuning, refit the winner's OBS weights on inputs propagated through its pruned layers, towards
    # a target pulled `refit_dense_weight` of the way to the dense model's own module outputs
    # (darwinlm.core.database.refit). On by default, by measurement (bench/results/database.json, SmolLM2,
    # uniform 50%): the weight is the one its curve's validation text chose (0.15 and 0.3 tie within noise);
    # it lowers held-out ppl on both texts (0.96x SOTU, 0.90x Moby-Dick), while no pull (0) raised SOTU's
    # (1.05x) and the full pull (1) is far worse than none.
    refit: bool = True
    refit_dense_weight: float = 0.15

    def __post_init__(self):
        if not 0.0 <= self.refit_dense_weight <= 1.0:
            raise DarwinLMError(f"post_train: refit_dense_weight {self.refit_dense_weight} is outside [0, 1]",
                                "use 0 for the propagated target, 1 for the dense model's outputs, or a blend")


@dataclass(frozen=True)
class EvaluateConfig:
    tasks: str = "local"  # comma-separated lm-eval task names, "local" for darwinlm's offline tasks, "" for none
    # examples per task (None: all); local tasks hold up to 500 each, which puts an accuracy's standard error near
    # ±0.02: a gap of a few points between two models is then more than noise
    task_limit: int | None = 500


@dataclass(frozen=True)
class ExportConfig:
    # Also write the pruned model as one GGUF file for llama.cpp at this weight type (f32, f16, q8_0, q4_k_m),
    # next to the HF folder, and log it with the registered model; None: no GGUF.
    gguf: str | None = None

    def __post_init__(self):
        if self.gguf is not None:
            from darwinlm.core.export.gguf import check_gguf_quant

            check_gguf_quant(self.gguf)


@dataclass(frozen=True)
class CompressConfig:
    model: str = "smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    teacher_top_k: int = 256
    search: SearchConfig = field(default_factory=SearchConfig)
    post_train: PostTrainConfig = field(default_factory=PostTrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dtype: str = "float32"  # or bfloat16, float16, auto (bfloat16 on a GPU, else float32)
    device: str = "auto"  # cuda when a GPU is present, else cpu; or cpu, cuda, cuda:N

    def __post_init__(self):
        seq_len = self.data.seq_len
        for index, stage in enumerate(self.search.stages):
            selectable = self.data.teacher_pool_rows - self.search.fixed_rows  # the fixed rows are never selected on
            if -(-stage.fitness_tokens // seq_len) > selectable:
                raise DarwinLMError(f"search stage {index} needs {stage.fitness_tokens} fitness tokens but "
                                    f"data.teacher_pool_rows − search.fixed_rows rows hold {max(selectable, 0) * seq_len}",
                                    "raise data.teacher_pool_rows or lower the stage's fitness_tokens")
            if -(-stage.finetune_tokens // seq_len) > self.data.train_rows:
                raise DarwinLMError(f"search stage {index} needs {stage.finetune_tokens} finetune tokens but "
                                    f"data.train_rows × seq_len holds {self.data.train_rows * seq_len}",
                                    "raise data.train_rows or lower the stage's finetune_tokens")
        if self.teacher_top_k < 1:
            raise DarwinLMError("teacher_top_k must be ≥ 1")

    @property
    def digest(self) -> str:
        """Names the run root. Export options are left out: a GGUF is derived from the finished model, so
        asking for one later resumes the same run and adds the file instead of redoing the compression.
        Database and search options enter as they enter the database's address and the search's name (an option
        added later, left off, keeps earlier runs' names)."""
        values = dataclasses.asdict(self)
        values.pop("export")
        values["database"] = self.database.address_values()
        values["search"] = self.search.address_values()
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Options renamed to say what they are; a config that still uses an old name is told the new one.
RENAMED_OPTIONS = {"fitness_rows": "teacher_pool_rows", "start_calibration_tokens": "start_slope_tokens"}


def _build(cls, values, where: str):
    """Instantiate dataclass `cls` from a mapping, recursively, refusing unknown keys."""
    if not isinstance(values, dict):
        raise DarwinLMError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown and RENAMED_OPTIONS.get(unknown[0]) in fields:
        raise DarwinLMError(f"option '{unknown[0]}' in {where} was renamed",
                            f"call it '{RENAMED_OPTIONS[unknown[0]]}'")
    if unknown:
        raise DarwinLMError(f"unknown option '{unknown[0]}' in {where}", f"known options: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = _NESTED.get((cls, name))
        if nested is StageConfig:
            kwargs[name] = tuple(_build(StageConfig, stage, f"{where}.{name}[{i}]") for i, stage in enumerate(value))
        elif nested is not None:
            kwargs[name] = _build(nested, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(fields[name].type, value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise DarwinLMError(f"bad value in {where}: {error}") from error


def _coerce(annotation, value, where: str):
    """Check a scalar against its field's type; YAML reads 1e-5 as a string, so floats accept numeric text."""
    allowed = getattr(annotation, "__args__", (annotation,))
    if value is None and type(None) in allowed:
        return None
    if float in allowed and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if str in allowed and isinstance(value, str):
        return value
    if bool in allowed and isinstance(value, bool):
        return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise DarwinLMError(f"bad value for {where}: expected {names}, got {value!r}")


_NESTED = {
    (CompressConfig, "data"): DataConfig,
    (CompressConfig, "database"): DatabaseConfig,
    (CompressConfig, "search"): SearchConfig,
    (CompressConfig, "post_train"): PostTrainConfig,
    (CompressConfig, "evaluate"): EvaluateConfig,
    (CompressConfig, "export"): ExportConfig,
    (SearchConfig, "stages"): StageConfig,
    (SearchConfig, "finetune"): FinetuneConfig,
    (PostTrainConfig, "finetune"): FinetuneConfig,
}


def load_preset(name_or_path: str, overrides: dict | None = None) -> CompressConfig:
    """A preset by name (see preset_names()) or a YAML file path, with optional nested overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DarwinLMError(f"no preset '{name_or_path}'", f"use one of {', '.join(preset_names())} or a YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DarwinLMError(f"preset {path} is not valid YAML ({str(error).splitlines()[0]})") from error
    return _build(CompressConfig, _merge(values, overrides or {}), f"preset {path.name}")


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def dotted_overrides(settings: dict[str, object]) -> dict:
    """Nested preset overrides from dotted option names: {"search.generations": 20} → {"search": {"generations":
    20}}. A string value is read as a YAML scalar ("20" → 20, "false" → False, "null" → None), so a setting
    typed on a command line means what it would in a preset; unknown names are refused when the preset is built."""
    nested: dict = {}
    for name, value in settings.items():
        *parents, leaf = name.split(".")
        if not leaf or not all(parents):
            raise DarwinLMError(f"setting '{name}' is not a dotted option name", "write it as e.g. search.generations")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DarwinLMError(f"setting '{name}' goes inside '{part}', which is set to a value")
        node[leaf] = _yaml_scalar(value) if isinstance(value, str) else value
    return nested


def parse_setting(text: str) -> tuple[str, str]:
    """'search.generations=20' → ('search.generations', '20'): a command line's --set."""
    name, separator, value = text.partition("=")
    if not separator or not name.strip():
        raise DarwinLMError(f"--set {text!r} is not NAME=VALUE", "write it as e.g. --set search.generations=20")
    return name.strip(), value.strip()


def _yaml_scalar(text: str):
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        return text


def config_from_dict(values: dict, where: str = "compress parameters") -> CompressConfig:
    """A CompressConfig from nested plain values (e.g. `CompressConfig.to_dict()` after a trip through JSON)."""
    values = dict(values)
    stages = values.get("search", {}).get("stages")
    if stages is not None:  # JSON turns the tuple of stages into a list; _build accepts either
        values["search"] = dict(values["search"], stages=list(stages))
    return _build(CompressConfig, values, where)
