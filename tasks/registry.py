"""The MLflow model registry's side of a compression: what a registered version is, what tells versions apart,
and which one a user gets by `models:/NAME@current-50`.

One registered name per base model (`smollm2-pruned`); per fraction removed, one alias (`current-50` for 50%).
The alias moves to a new version only when that version beats the one holding it on the same held-out
validation windows of the same text (the pruned model's in-domain perplexity: which model users get is a choice,
and the reported test-window figures must not make it); a baseline (`--generations 0`) or an ablation
registers with its `role` and never takes it; `darwinlm promote` moves it by hand. MLflow reserves `latest`.
"""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.metrics import is_se_key
from darwinlm.core.uri_io import sha256

ALIAS_PREFIX = "current"
# What a version was registered for: only a `candidate` competes for the alias.
CANDIDATE, BASELINE, ABLATION = "candidate", "baseline", "ablation"
# Version tags the alias policy reads: the pruned model's perplexity on the in-domain set's validation windows,
# which set, and a digest of the windows and the split they were drawn from (compared only when it is equal).
PPL_TAG, SET_TAG, WINDOWS_TAG, ROLE_TAG, DECISION_TAG = (
    "held_out_ppl", "held_out_set", "held_out_windows", "role", "alias_decision")
FRACTION_TAG = "fraction_removed"
# The file logged with every model as its code (MLflow "models from code"): it must not import darwinlm.
TEXT_GENERATION_CODE = Path(__file__).with_name("mlflow_text_generation.py")
HF_FOLDER_ARTIFACT = "hf_model"  # mlflow_text_generation.HF_FOLDER_ARTIFACT; that file cannot import this one


def alias_for(fraction_removed: float) -> str:
    """`current-50` for half the block parameters removed."""
    return f"{ALIAS_PREFIX}-{round(100 * fraction_removed)}"


def role_of(generations: int, ablation: bool = False) -> str:
    if ablation:
        return ABLATION
    return BASELINE if generations == 0 else CANDIDATE


def held_out_figure(evaluation: dict) -> tuple[str, float]:
    """(the in-domain evaluation set, the pruned model's perplexity on its validation windows), from the
    evaluation's `validation` record: the set the evaluation names as in domain, else its first `ppl_<set>`."""
    validation = evaluation.get("validation")
    if not validation:
        raise DarwinLMError("the evaluation has no validation-window perplexity (an older darwinlm wrote it)",
                            "delete the run's evaluation.json and rerun the compression to evaluate it again")
    sets = [key.removeprefix("ppl_") for key in validation if key.startswith("ppl_") and not is_se_key(key)]
    name = evaluation.get("in_domain") if evaluation.get("in_domain") in sets else sets[0]
    return name, float(validation[f"ppl_{name}"])


def windows_digest(evaluation: dict, split_digest: str) -> str:
    """What two perplexities must share to be compared: the validation windows' record (split, protocol, the
    compared set's count and spread) and the text split they were drawn from. Only the set held_out_figure
    compares is named, so a record that also holds the other sets' figures compares with one that does not."""
    windows = evaluation["validation"]["windows"]
    name, _ = held_out_figure(evaluation)
    record = {"windows": {**windows, "sets": {name: windows["sets"][name]}}, "split": split_digest}
    return sha256(json.dumps(record, sort_keys=True).encode())[:16]


def version_tags(evaluation: dict, split_digest: str, *, fraction_removed: float, preset: str, generations: int,
                 seed: int, role: str) -> dict[str, str]:
    """What tells one version from another in the registry's list, and what the alias policy compares."""
    name, ppl = held_out_figure(evaluation)
    return {FRACTION_TAG: f"{fraction_removed:g}", "preset": preset, "generations": str(generations),
            "seed": str(seed), ROLE_TAG: role, SET_TAG: name, PPL_TAG: f"{ppl:.6g}",
            WINDOWS_TAG: windows_digest(evaluation, split_digest)}


@dataclasses.dataclass(frozen=True)
class AliasDecision:
    alias: str
    moved: bool
    reason: str


def decide_alias(alias: str, version: str, tags: dict, holder: str | None, holder_tags: dict | None
                 ) -> AliasDecision:
    """Whether `version` (with `tags`) takes `alias` from `holder` (None: nobody holds it), and why."""
    role = tags.get(ROLE_TAG, CANDIDATE)
    if role != CANDIDATE:
        return AliasDecision(alias, False, f"version {version} is a {role} run: it never takes {alias}")
    if holder == version:
        return AliasDecision(alias, False, f"version {version} already holds {alias}")
    if holder is None:
        return AliasDecision(alias, True, f"version {version} is the first candidate for {alias}")
    keep = f"{alias} stays on version {holder}"
    if PPL_TAG not in holder_tags or WINDOWS_TAG not in holder_tags:
        return AliasDecision(alias, False, f"{keep}: it records no held-out figures to compare with "
                                           f"(move it with `darwinlm promote`)")
    if (holder_tags[WINDOWS_TAG], holder_tags.get(SET_TAG)) != (tags[WINDOWS_TAG], tags[SET_TAG]):
        return AliasDecision(alias, False, f"{keep}: version {version} was measured on other held-out windows "
                                           f"or text ({tags[WINDOWS_TAG]} vs {holder_tags[WINDOWS_TAG]}), so "
                                           f"their perplexities are not comparable (move it with `darwinlm promote`)")
    ppl, held = float(tags[PPL_TAG]), float(holder_tags[PPL_TAG])
    figure = f"ppl_{tags[SET_TAG]}"
    if ppl < held:
        return AliasDecision(alias, True, f"version {version} takes {alias} from version {holder}: "
                                          f"{figure} {ppl:.4g} < {held:.4g}")
    return AliasDecision(alias, False, f"{keep}: version {version}'s {figure} {ppl:.4g} is not below its {held:.4g}")


def alias_holder(client, name: str, alias: str):
    """The version holding `alias` of `name`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def offer_alias(client, name: str, version: str, alias: str) -> AliasDecision:
    """Apply the alias policy to a newly registered `version`; its decision is tagged on the version too."""
    holder = alias_holder(client, name, alias)
    tags = client.get_model_version(name, version).tags
    decision = decide_alias(alias, str(version), tags, str(holder.version) if holder else None,
                            holder.tags if holder else None)
    if decision.moved:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, DECISION_TAG, decision.reason)
    return decision


def promote(client, name: str, version: str, alias: str | None = None) -> AliasDecision:
    """Move `alias` (default: the version's fraction's, e.g. current-50) of `name` to `version`, by hand."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(model.name for model in client.search_registered_models())
        raise DarwinLMError(f"no registered model '{name}'", f"registered: {', '.join(known) or 'none'}") from None
    if not str(version).isdigit():
        raise DarwinLMError(f"version '{version}' is not a version number", "pass e.g. 3")
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise DarwinLMError(f"'{name}' has no version {version}",
                            f"its versions: {', '.join(map(str, versions)) or 'none'}") from None
    if alias is None:
        if FRACTION_TAG not in found.tags:
            raise DarwinLMError(f"version {version} of '{name}' records no {FRACTION_TAG}", "pass --alias")
        alias = alias_for(float(found.tags[FRACTION_TAG]))
    holder = alias_holder(client, name, alias)
    client.set_registered_model_alias(name, alias, found.version)
    previous = str(holder.version) if holder else None
    reason = f"promoted by hand to {alias}" + (f" (from version {previous})" if previous not in (None, str(version))
                                               else "")
    client.set_model_version_tag(name, found.version, DECISION_TAG, reason)
    return AliasDecision(alias, True, reason)


def save_text_generation_model(model_dir: str, path: str) -> None:
    """Write the exported HF folder at `model_dir` as an MLflow pyfunc model at `path`: a text generator whose
    code (mlflow_text_generation.py) and weights travel with it, so `mlflow.pyfunc.load_model` runs it where
    darwinlm is not installed. Requirements are explicit (MLflow's inference would look for torchvision)."""
    import mlflow.pyfunc
    from importlib.metadata import version
    from mlflow.models import infer_signature

    requirements = [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers",
                                                                                   "safetensors", "tokenizers")]
    signature = infer_signature(["The President said"], ["The President said that"],
                                params={"max_new_tokens": 32})
    mlflow.pyfunc.save_model(path, python_model=str(TEXT_GENERATION_CODE), artifacts={HF_FOLDER_ARTIFACT: model_dir},
                             signature=signature, pip_requirements=requirements)


def log_text_generation_model(client, run_id: str, model_dir: str, artifact_path: str = "model") -> str:
    """Log the exported folder as the run's MLflow model at `artifact_path`; returns its artifact URI (the
    source a model version points at). Through the client, not mlflow's thread-local active run: Prefect may
    run tasks on worker threads."""
    folder = tempfile.mkdtemp(prefix="darwinlm-mlflow-model-")
    try:
        save_text_generation_model(model_dir, str(Path(folder) / "model"))
        client.log_artifacts(run_id, str(Path(folder) / "model"), artifact_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
