"""MLflow tracking for compressions: one parent run per compression, nested runs per stage, the registry.

Runs are addressed by id through MlflowClient rather than mlflow's thread-local "active run", because Prefect
may run tasks on worker threads. The default store is sqlite under the data home; MLFLOW_TRACKING_URI wins.
Which registered version a user gets (the `current-<percent>` aliases) is tasks.registry's.
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from darwinlm.core import __version__
from darwinlm.core.home import data_home
from darwinlm.tasks.refs import GenomeRef
from darwinlm.tasks.registry import log_text_generation_model

EXPERIMENT = "darwinlm"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    data_home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_home() / 'mlflow.db'}"


def mlflow_ui_arguments(port: int) -> list[str]:
    """`mlflow ui`'s arguments for darwinlm's store: the tracking URI and, beside a sqlite store, its artifacts.
    The caller runs it with darwinlm's environment (telemetry off: flows.offline)."""
    uri = tracking_uri()
    arguments = ["ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    location = _artifact_location(uri)
    return arguments + (["--default-artifact-root", location] if location else [])


def _artifact_location(uri: str) -> str | None:
    """Next to a sqlite store (MLflow would otherwise use ./mlruns in whatever folder we run from); a tracking
    server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


class Tracker:
    def __init__(self, uri: str | None = None, experiment: str = EXPERIMENT):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri or tracking_uri())
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = _artifact_location(uri or tracking_uri())
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        if found is None or found.tags.get(EXPERIMENT_KIND_TAG) is None:
            # Without it, MLflow 3's UI opens the experiment in its GenAI view (traces, an assistant panel) until a
            # user picks "model training"; set on experiments made before this tag was, too.
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def start(self, name: str, params: dict | None = None, tags: dict | None = None,
              parent: str | None = None) -> str:
        tags = dict(tags or {})
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        for key, value in (params or {}).items():
            self.client.log_param(run.info.run_id, key, str(value)[:6000])
        return run.info.run_id

    def metrics(self, run_id: str, values: dict, step: int | None = None) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(run_id, key, float(value), step=step or 0)

    def tags(self, run_id: str, values: dict) -> None:
        for key, value in values.items():
            if value is not None:
                self.client.set_tag(run_id, key, str(value)[:5000])

    def curve(self, run_id: str, key: str, values: list[float]) -> None:
        """`values` as one metric's history, step 0 on (a loss per training step), in one request."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for step, value in enumerate(values)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def text(self, run_id: str, text: str, filename: str) -> None:
        self.client.log_text(run_id, text, filename)

    def figure(self, run_id: str, figure, filename: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / filename
            figure.savefig(path, dpi=100, bbox_inches="tight")
            self.client.log_artifact(run_id, str(path))
        from matplotlib import pyplot

        pyplot.close(figure)  # pyplot keeps every figure it made: a long-lived worker would hold them all

    def registered_version(self, name: str, tags: dict) -> str | None:
        """The version of `name` carrying all of `tags`, if one was registered (by a run that then crashed)."""
        wanted = {k: str(v) for k, v in tags.items()}
        for version in self.client.search_model_versions(f"name='{name}'"):
            if all(version.tags.get(k) == v for k, v in wanted.items()):
                return str(version.version)
        return None

    def register(self, run_id: str, model_dir: str, name: str, tags: dict, description: str | None = None) -> str:
        """Log the exported folder as the run's MLflow model (`model`: a pyfunc text generator that loads where
        darwinlm is not installed, see tasks.registry) and register it, with a description of what it is;
        returns the version. No alias moves here: that is registry.offer_alias's decision."""
        from mlflow.exceptions import MlflowException

        source = log_text_generation_model(self.client, run_id, model_dir)
        try:
            self.client.create_registered_model(name, tags={"darwinlm": "pruned"})
        except MlflowException:
            pass  # registered by an earlier compression of the same base model
        version = self.client.create_model_version(name, source=source, run_id=run_id, description=description,
                                                   tags={k: str(v) for k, v in tags.items()})
        return str(version.version)  # MLflow 3 gives an int here, a str elsewhere

    def add_gguf(self, name: str, version: str, run_id: str, gguf_path: str) -> None:
        """Log the GGUF file under the run's `gguf/` artifacts and point the model version at it (tag `gguf`)."""
        self.client.log_artifact(run_id, gguf_path, "gguf")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/gguf/{Path(gguf_path).name}"
        self.client.set_model_version_tag(name, version, "gguf", source)


def provenance(config) -> dict:
    """What every run of a compression records about where it ran: the code (git commit, when darwinlm runs
    from a git checkout, and whether that had uncommitted changes; darwinlm's version), the text `data.text`
    resolved (None means the default corpus: its pinned packages and folder) and the device `auto` became."""
    from darwinlm.core.model.loading import resolve_device

    commit, dirty = git_commit()
    tags = {"git_commit": commit or "none (not a git checkout)", "darwinlm_version": __version__,
            "text_source": text_source(config.data.text), "device": resolve_device(config.device)}
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit  # MLflow's own tag: its run page shows it
        tags["git_dirty"] = str(dirty).lower()
    return tags


def git_commit() -> tuple[str | None, bool]:
    """(HEAD of the git checkout darwinlm runs from, whether tracked files differ from it); (None, False) for an
    installed copy or a machine without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, False
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if head.returncode != 0:
        return None, False
    return head.stdout.strip(), bool(status.stdout.strip())


def text_source(text: str | None) -> str:
    """What `data.text` means: the user's source as given, or for None the default corpus's pinned packages."""
    if text is not None:
        return text
    from darwinlm.core.data.default_corpus import TEXT_PACKAGES
    from darwinlm.core.home import default_text_dir

    return f"default corpus: {' + '.join(TEXT_PACKAGES)} (unpacked at {default_text_dir()})"


def resolved_params(config) -> dict:
    """The config as MLflow params, with what `auto` and None resolved to in this run (config.yaml keeps the
    options as given, which is what reproduces the run on another machine)."""
    from darwinlm.core.model.loading import resolve_device, resolve_dtype

    params = flat_params(config.to_dict())
    device = resolve_device(config.device)
    params.update({"device": device, "dtype": resolve_dtype(config.dtype, device),
                   "data.text": text_source(config.data.text)})
    return params


def run_title(preset: str, config) -> str:
    """A compress run's name, saying what tells it from its neighbours in MLflow's run list."""
    search = config.search
    return (f"{Path(preset).stem} · {config.model.rstrip('/').split('/')[-1]} {search.target_label} · "
            f"{search.generations} generations · seed {search.seed}")


def record_database(tracker: "Tracker", run_id: str, database_ref, built: bool) -> None:
    """The database stage's run: which database (digest, URI), whether this run built it or found it, its size
    in modules and levels, and the per-layer pruning error plot."""
    from darwinlm.core.database.store import Database

    manifest = Database.open(database_ref.uri).manifest
    modules = manifest["modules"]
    tracker.tags(run_id, {"database_digest": database_ref.digest, "database_uri": database_ref.uri,
                          "built_by_this_run": str(built).lower()})
    tracker.metrics(run_id, {"modules": len(modules), "levels": sum(len(m["levels"]) for m in modules),
                             "max_levels_per_module": max((len(m["levels"]) for m in modules), default=0)})
    tracker.figure(run_id, database_error_plot(manifest), "error_per_layer.png")


def database_error_plot(manifest: dict):
    """Per layer and module kind, the stored pruning error at the level nearest half the units removed: where
    the search will find it cheap or dear to prune."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(8, 3))
    for kind, label in (("attn", "attention, half the heads removed"), ("mlp", "MLP, half the channels removed")):
        points = []
        for module in sorted((m for m in manifest["modules"] if m["kind"] == kind), key=lambda m: m["layer"]):
            half = min(module["levels"], key=lambda level: abs(level["units_removed"] - module["n_units"] / 2))
            points.append((module["layer"], half.get("error", float("nan"))))
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set(xlabel="layer", ylabel="stored relative error", title="Pruning error per layer (database)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return figure


def record_refit(tracker: "Tracker", run_id: str, refit_ref) -> None:
    """The refit stage's run: mean relative output error of the winner's modules before and after the refit."""
    tracker.metrics(run_id, {"error_before": refit_ref.error_before, "error_after": refit_ref.error_after})
    tracker.tags(run_id, {"refit_uri": refit_ref.uri})


def record_post_train(tracker: "Tracker", run_id: str, model_ref) -> None:
    """The post-training stage's run: its loss per step (kept in the export's darwinlm.json) and the export."""
    from darwinlm.core import uri_io

    info = json.loads(uri_io.read_bytes(uri_io.join(model_ref.uri, "darwinlm.json")))
    tracker.curve(run_id, "loss", info.get("post_train_losses") or [])
    tracker.tags(run_id, {"model_uri": model_ref.uri, "genome_digest": info.get("genome"),
                          "database_digest": info.get("database"), "refit": info.get("refit")})


def record_evaluation(tracker: "Tracker", run_id: str, evaluation: dict, model_ref) -> None:
    """The evaluation stage's run: every dense and pruned figure (test windows), the pruned model's in-domain
    validation-window perplexity, and which held-out windows they read."""
    for name in ("dense", "pruned", "validation"):  # validation: the pruned model's, which the alias compares
        tracker.metrics(run_id, {f"{name}_{key}": value for key, value in evaluation.get(name, {}).items()})
    windows = evaluation.get("windows") or {}
    tracker.tags(run_id, {"model_uri": model_ref.uri, "windows_split": windows.get("split"),
                          "windows_protocol": windows.get("protocol"), "in_domain": evaluation.get("in_domain")})


def flat_params(values: dict, prefix: str = "") -> dict:
    """A nested config as MLflow params: {"search.offspring": 4, ...}; lists (the stages) as their JSON."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def generation_metrics(record: dict) -> dict:
    """A search generation's record as MLflow metrics: the parent's fixed-row KL (the trajectory), whether the
    parent was replaced (`accepted`, 0 or 1) and the acceptance rate, move size, the paired z of the best
    challenger against the parent (how clear the decision was; absent when no challenger beat the parent on the
    rows, where there is no decision to measure), and the best and median candidate of every selection stage."""
    metrics = {key: record[key] for key in ("fixed_kl", "best_fitness", "acceptance_rate", "move_size", "kept",
                                            "evaluations", "wall_s", "compute_s") if key in record}
    if "accepted" in record:
        metrics["accepted"] = float(record["accepted"])
    if record.get("paired_z") is not None and abs(record["paired_z"]) != float("inf"):
        metrics["paired_z"] = record["paired_z"]
    for index, stage in enumerate(record.get("stages", [])):
        metrics[f"stage{index}_best"], metrics[f"stage{index}_median"] = stage["best"], stage["median"]
    return metrics


def plots(genome_ref: GenomeRef, database_manifest: dict):
    """(kept heads and channels per layer, fitness curve) as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    from matplotlib import pyplot

    modules = {(m["layer"], m["kind"]): m for m in database_manifest["modules"]}
    layers = range(len(genome_ref.attn))
    kept = {kind: [1 - modules[(i, kind)]["levels"][levels[i]]["units_removed"] / modules[(i, kind)]["n_units"]
                   for i in layers] for kind, levels in (("attn", genome_ref.attn), ("mlp", genome_ref.mlp))}
    structure, axis = pyplot.subplots(figsize=(8, 3))
    axis.bar([i - 0.2 for i in layers], kept["attn"], width=0.4, label="attention heads kept")
    axis.bar([i + 0.2 for i in layers], kept["mlp"], width=0.4, label="MLP channels kept")
    axis.set(xlabel="layer", ylabel="fraction kept", ylim=(0, 1), title="What the pruned model keeps, per layer")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    curve, axis = pyplot.subplots(figsize=(6, 3))
    steps, values = fitness_curve(genome_ref)
    axis.plot(steps, values, marker="o", label="parent")
    uniform_kl = genome_ref.start.get("uniform_kl")
    if uniform_kl is not None:  # the start chose between uniform and informed: uniform's KL is the bar to beat
        axis.axhline(uniform_kl, color="grey", linestyle=":", label="uniform pruning")
    axis.set(xlabel="generations completed (0: the start)", ylabel="KL to dense, fixed rows",
             title="The search's parent on rows it never selects on")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return structure, curve


def fitness_curve(genome_ref: GenomeRef) -> tuple[list[int], list[float]]:
    """(generations completed, the parent's KL on the fixed rows then), from the start (0) on; the fixed rows are
    never selected on, so the figures are comparable from one generation to the next."""
    history = genome_ref.history
    if not history:
        return ([0], [genome_ref.fixed_kl]) if genome_ref.fixed_kl is not None else ([], [])
    return ([0] + [h["generation"] + 1 for h in history],
            [history[0]["previous_fixed_kl"]] + [h["fixed_kl"] for h in history])
