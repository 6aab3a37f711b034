"""What a user sets when starting a compression: the Prefect form's fields, and what the CLI's options are made from.

Cheap to import (pydantic, no torch or prefect), so `darwinlm compress --help` lists the options at once.
"""

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import data_home
from darwinlm.core.preset_files import preset_names

if TYPE_CHECKING:
    from darwinlm.core.config import CompressConfig

PresetName = Literal[tuple(preset_names())]  # the Prefect form renders a choice list


# Each typed field of CompressParameters that sets a preset option, and the option's dotted name: the Prefect
# form shows these fields, and the CLI derives its options from them (flows.cli), so each is declared once.
# Any other option goes through `settings` (the CLI's --set NAME=VALUE).
SHORTCUTS = {"model": "model", "text": "data.text", "fraction_removed": "search.fraction_removed",
             "generations": "search.generations", "seed": "search.seed", "offspring": "search.offspring",
             "budget_kind": "search.budget_kind", "latency_engine": "search.latency_engine", "start": "search.start"}


class CompressParameters(BaseModel):
    """What a user sets when starting a compression; unset fields keep the preset's values."""

    preset: PresetName = Field("smollm2-demo", description="a preset shipped with darwinlm")
    preset_file: str | None = Field(None, description="or: the path of a preset YAML of your own (wins over preset)")
    model: str | None = Field(None, description="`smollm2`, a Hugging Face folder, or a hub id")
    text: str | None = Field(None, description="folder of .txt, a .jsonl, or hf:NAME:SPLIT; default: built-in text")
    text_field: str = Field("text", description="the text field of .jsonl / hf datasets")
    fraction_removed: float | None = Field(None, ge=0.0, lt=1.0, description="share of block parameters to remove")
    generations: int | None = Field(None, ge=0, description="search generations")
    seed: int | None = Field(None, description="search seed")
    offspring: int | None = Field(None, ge=1, description="offspring per generation")
    budget_kind: Literal["params", "flops", "latency"] | None = Field(
        None, description="what the budget counts: kept parameters, FLOPs per token, or measured latency")
    latency_engine: Literal["torch", "llama.cpp"] | None = Field(
        None, description="where a latency budget is measured: torch on this machine, or llama.cpp (as served)")
    start: Literal["best", "informed", "uniform"] | None = Field(
        None, description="the search's first parent: the better on fixed rows of uniform and informed (best)")
    settings: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="any other preset option by its dotted name, e.g. "
        "{\"search.accept_z\": 0.5, \"post_train.refit\": false}")
    role: Literal["ablation"] | None = Field(
        None, description="ablation: register the model with role `ablation`, never as current-<percent> (a run "
        "with 0 generations registers as a baseline either way)")
    store: str | None = Field(None, description="artifact root (path or s3://...); default: the data home")
    dask_workers: int = Field(0, ge=0, description="evaluate offspring on a local Dask cluster of this many "
                              "worker processes (0: in the flow's process); the genome does not change")
    dask_address: str | None = Field(None, description="or: the scheduler address of a running Dask cluster, "
                                     "e.g. tcp://10.0.0.5:8786 (workers must reach the model and the store)")

    def config(self) -> "CompressConfig":
        from darwinlm.core.config import dotted_overrides, load_preset  # torch comes with it: only when needed

        chosen = {option: getattr(self, field) for field, option in SHORTCUTS.items() if getattr(self, field) is not None}
        if self.text is not None:
            chosen["data.text_field"] = self.text_field
        for option in set(chosen) & set(self.settings):
            raise DarwinLMError(f"{option} is given twice, as a field and in settings", "give it once")
        return load_preset(self.preset_file or self.preset, dotted_overrides({**chosen, **self.settings}))

    @classmethod
    def of(cls, preset: str, **values) -> "CompressParameters":
        """Parameters for a preset given by name or as a YAML path (the CLI and the nightly flow take either)."""
        if preset in preset_names():
            return cls(preset=preset, **values)
        return cls(preset_file=preset, **values)

    def store_uri(self) -> str:
        return self.store or str(data_home())
