"""What the tasks hand each other: small, typed references to artifacts on storage, never tensors.

Each is a frozen pydantic model, so a Prefect task's inputs and results show as named fields in the UI, a
Dask worker receives them pickled, and a typo in a field name fails at once instead of as a KeyError later.
`model_dump()` gives the JSON that is also what the task writes to storage where the reference is its record.
"""

from pydantic import BaseModel, ConfigDict


class Ref(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataRef(Ref):
    """The run's data split (data.json): its description and the digests that address everything built on it."""

    split: dict
    split_digest: str
    calibration_digest: str
    base_model_digest: str
    # The store the run belongs to: the dense model's teachers and evaluation there are shared by every run of
    # the same model and rows (other seeds, fractions, schedules). None in a run prepared before they were.
    store_uri: str | None = None
    # The held-out windows' validation/test split (PreparedData.windows_record): protocol, rule, and every
    # window's start per evaluation set and split. None in a run prepared before the split existed.
    eval_windows: dict | None = None


class DatabasePlan(Ref):
    """Where the content-addressed database lives, its layer count, and whether an earlier run finished it."""

    uri: str
    num_layers: int
    finished: bool


class DatabaseRef(Ref):
    uri: str
    digest: str


class GenomeRef(Ref):
    """The search's winner (genome.json): the level-file fields of `Genome.to_json` plus the search's record."""

    database: str
    attn: list[int]
    mlp: list[int]
    kept_params: int
    dense_params: int
    budget_kind: str
    fitness: float | None = None
    fixed_kl: float | None = None
    start: dict = {}
    history: list[dict] = []


class RefitRef(Ref):
    """The winner's refitted weights (refit.safetensors), and the mean relative output error of its modules on
    the propagated calibration inputs, against the refit's target (see post_train.refit_dense_weight), with the
    database's weights and with the refitted ones."""

    uri: str
    error_before: float
    error_after: float


class ModelRef(Ref):
    """An exported Hugging Face folder."""

    uri: str


class GgufRef(Ref):
    uri: str
    quant: str
