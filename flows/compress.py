"""The `compress` flow: the whole DarwinLM pipeline as Prefect tasks, tracked in MLflow.

    prepare-data → plan-database → database-layer × layers → finish-database
                 → choose-start → (search-generation → select × stages) × generations → finish-search
                 → post-train-and-export → evaluate → export-gguf (when export.gguf is set) → register

Each stage's artifact lives under the run root on the store (a path or fsspec URI); the run root is named by
the config digest and the base model, so running the same compression again resumes it (or does nothing
when it finished). What depends only on the dense model and the rows (the database, the teachers, the dense
model's evaluation) is addressed by content on the store instead, so runs that differ only in search or
post-training settings share it. Parameters are a pydantic model, so the Prefect UI renders them as a form.
"""

import json
import time
from uuid import UUID

import yaml
from prefect import flow, get_run_logger

from darwinlm.core import store_layout, uri_io
from darwinlm.core.compression import start_needs_a_model
from darwinlm.core.config import CompressConfig, config_from_dict
from darwinlm.core.database.store import Database
from darwinlm.core.evaluation.metrics import is_se_key
from darwinlm.core.search.genome import cost_text
from darwinlm.flows.offline import apply_offline_defaults
from darwinlm.flows.parameters import CompressParameters
from darwinlm.core.store_layout import readable_name
from darwinlm.tasks.stages import (database_finish_task, database_layer_task, database_plan_task, evaluate_task,
                          gguf_task, post_train_task, prepare_data_task, refit_task, search_finish_task,
                          search_generation_task, search_start_task)
from darwinlm.flows.artifacts import SearchProgress, publish_summary, run_prefix
from darwinlm.tasks.refs import DatabaseRef, DataRef
from darwinlm.tasks.registry import alias_for, held_out_figure, offer_alias, role_of, version_tags
from darwinlm.tasks.tracking import (Tracker, generation_metrics, plots, provenance, record_database,
                                     record_evaluation, record_post_train, record_refit, resolved_params, run_title)


def run_root(parameters: CompressParameters) -> str:
    """Same config (which names the model and the text) → same run root: re-running resumes or does nothing."""
    config = parameters.config()
    return store_layout.run_root(parameters.store_uri(), config.digest, config.model)


def _flow_run_name() -> str:
    """The Prefect flow run's name, as the MLflow run's (tracking.run_title): preset, fraction, generations, seed."""
    from prefect.runtime import flow_run

    try:
        given = flow_run.parameters["parameters"]
        parameters = CompressParameters.model_validate(given if isinstance(given, dict) else given.model_dump())
        return run_title(_preset_name(parameters), parameters.config())
    except Exception:  # noqa: BLE001 — a name must never stop a run; a bad config fails in the flow, with its message
        return "compress"


@flow(name="compress", log_prints=True, flow_run_name=_flow_run_name)
def compress(parameters: CompressParameters = CompressParameters()) -> dict:
    """Compress a model end to end; returns the run's summary (URIs, digests, evaluation)."""
    apply_offline_defaults()
    started = time.perf_counter()
    config = parameters.config()
    values, store = json.loads(json.dumps(config.to_dict())), parameters.store_uri()
    logger = get_run_logger()
    run_uri = run_root(parameters)
    waiting = lambda: logger.info("another compression of %s is running; waiting for it", run_uri)  # noqa: E731
    with uri_io.lock(store_layout.RunLayout(run_uri).lock, on_wait=waiting):  # the twin then finds its work done
        return _run_stages(parameters, config, values, store, run_uri, started, logger)


def _run_stages(parameters, config, values, store, run_uri, started, logger) -> dict:
    data = prepare_data_task(values, run_uri, store)
    tracker = Tracker()
    lineage = {"base_model": config.model, "base_model_digest": data.base_model_digest,
               "split_digest": data.split_digest, "config_digest": config.digest}
    origin = provenance(config)  # every run, the children too: each says what code, text and device made it
    preset = _preset_name(parameters)
    parent = tracker.start(run_title(preset, config), params={"preset": preset, "run_uri": run_uri,
                                                             "config_digest": config.digest, **resolved_params(config)},
                           tags={**lineage, **origin})
    tracker.text(parent, yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False), "config.yaml")
    stage_tags = {**lineage, **origin}
    try:
        database_ref = _stage(tracker, parent, "database", lambda: _build_database(values, store, data), stage_tags,
                              lambda run, built: record_database(tracker, run, *built))[0]
        tracker.client.set_tag(parent, "database_digest", database_ref.digest)
        search_run = tracker.start("search", tags=stage_tags, parent=parent,
                                   params={"database_digest": database_ref.digest})
        search = search_flow
        if parameters.dask_workers or parameters.dask_address:
            search = search_flow.with_options(task_runner=dask_runner(parameters))
        # made here, so the progress shows on the compress run where users look; the subflow moves it forward
        progress = SearchProgress.create(run_prefix(readable_name(config.model), config.digest),
                                         config.search.generations)
        search(values, run_uri, database_ref, search_run, distributed=search is not search_flow,
               progress_artifact=str(progress.artifact_id))
        genome_ref = search_finish_task(values, run_uri, database_ref)
        structure, curve = plots(genome_ref, Database.open(database_ref.uri).manifest)
        tracker.figure(search_run, structure, "kept_per_layer.png")
        tracker.figure(search_run, curve, "fitness_curve.png")
        tracker.metrics(search_run, {"kept_params": genome_ref.kept_params, "fitness": genome_ref.fitness})
        start = genome_ref.start
        tracker.client.set_tag(search_run, "start", start.get("chosen", "uniform"))
        tracker.metrics(search_run, {f"start_{key}": value for key, value in start.items()})
        tracker.finish(search_run)
        refit_ref = _stage(tracker, parent, "refit", lambda: refit_task(values, run_uri, database_ref, genome_ref),
                           {**stage_tags, "database_digest": database_ref.digest},
                           lambda run, ref: record_refit(tracker, run, ref))
        if refit_ref is not None:
            tracker.metrics(parent, {"refit_error_before": refit_ref.error_before,
                                     "refit_error_after": refit_ref.error_after})
        model_ref = _stage(tracker, parent, "post_train",
                           lambda: post_train_task(values, run_uri, database_ref, genome_ref, refit_ref),
                           {**stage_tags, "database_digest": database_ref.digest},
                           lambda run, ref: record_post_train(tracker, run, ref))
        evaluation = _stage(tracker, parent, "evaluate", lambda: evaluate_task(values, run_uri, model_ref),
                            stage_tags, lambda run, result: record_evaluation(tracker, run, result, model_ref))
        for name in ("dense", "pruned"):
            tracker.metrics(parent, {f"{name}_{key}": value for key, value in evaluation[name].items()})
        if "sample" in evaluation:
            tracker.text(parent, json.dumps(evaluation["sample"], indent=1), "greedy_sample.json")
        role = role_of(config.search.generations, ablation=parameters.role == "ablation")
        description = (f"{role}: {config.model} with {config.search.fraction_removed:.0%} of its block parameters "
                       f"removed ({genome_ref.kept_params / genome_ref.dense_params:.1%} of its block parameters kept; preset "
                       f"{preset}, "
                       f"{config.search.generations} generations from the {genome_ref.start.get('chosen', 'uniform')}"
                       f" start, seed {config.search.seed}); held-out test windows, dense → pruned: "
                       + ", ".join(f"{key} {evaluation['dense'][key]:.2f} → {evaluation['pruned'][key]:.2f}"
                                   for key in evaluation["pruned"] if key.startswith("ppl_") and not is_se_key(key))
                       + "; the alias compares ppl_{} on the validation windows: {:.2f}".format(
                           *held_out_figure(evaluation)))
        tags = {**lineage, "database_digest": database_ref.digest, "database_uri": database_ref.uri,
                "search_run": search_run, "compress_run": parent, "run_uri": run_uri,
                **version_tags(evaluation, data.split_digest, fraction_removed=config.search.fraction_removed,
                               preset=preset, generations=config.search.generations, seed=config.search.seed,
                               role=role)}
        gguf_ref = gguf_task(values, run_uri, model_ref) if config.export.gguf else None
        registered = _register(tracker, parent, config, model_ref, tags, run_uri, description, stage_tags, gguf_ref)
        version = registered["version"]
        logger.info("registered %s version %s: %s", registered["name"], version,
                    registered.get("alias_decision", "registered before aliases were per fraction"))
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    tracker.finish(parent)
    summary = {"run_uri": run_uri, "config_digest": config.digest, "model_uri": model_ref.uri,
               "database": database_ref.model_dump(), "mlflow_run_id": parent,
               "registered_model": _registered_name(config), "registered_version": version,
               "alias": {key: registered.get(key) for key in ("alias", "alias_moved", "alias_decision")},
               "gguf_uri": gguf_ref.uri if gguf_ref else None,
               "evaluation": evaluation, "evaluation_labels": data.split.get("labels", {}),
               "kept_params": genome_ref.kept_params,
               "dense_params": genome_ref.dense_params, "wall_s": time.perf_counter() - started}
    logger.info("compressed %s: %s", config.model, json.dumps({k: summary[k] for k in ("model_uri", "mlflow_run_id")}))
    publish_summary(run_prefix(readable_name(config.model), config.digest), summary, tracker.experiment_id)
    return summary


def _search_flow_run_name() -> str:
    """The search subflow's run name: the compress run's, less the preset it does not receive."""
    from prefect.runtime import flow_run

    try:
        search = config_from_dict(flow_run.parameters["values"]).search
        return f"search · {search.target_label} · {search.generations} generations · seed {search.seed}"
    except Exception:  # noqa: BLE001 — a name must never stop a run
        return "search"


@flow(name="search", log_prints=True, flow_run_name=_search_flow_run_name)
def search_flow(values: dict, run_uri: str, database_ref: DatabaseRef, search_run: str, distributed: bool = False,
                progress_artifact: str | None = None) -> None:
    """The search's start (its own task, when it needs the model: choosing the informed start takes minutes),
    then its generations, each a task with a task per selection stage; with a Dask task runner
    (`distributed`), every candidate's finetune-and-fitness is its own task on a Dask worker. Each generation
    moves the progress artifact `progress_artifact` (an id; the compress flow makes it) forward."""
    config, logger, tracker = config_from_dict(values), get_run_logger(), Tracker()
    progress = SearchProgress(config.search.generations, UUID(progress_artifact)) if progress_artifact else None
    if config.search.generations or start_needs_a_model(config):
        start = search_start_task(values, run_uri, database_ref)
        # step 0 is the start, so the trajectory begins where the search did
        tracker.metrics(search_run, {"fixed_kl": start.get("fixed_kl")}, step=0)
    for generation in range(config.search.generations):
        record = search_generation_task(values, run_uri, database_ref, generation, distributed)
        tracker.metrics(search_run, generation_metrics(record), step=generation + 1)
        if progress is not None:
            progress.update(record)
        logger.info("search generation %d/%d: parent KL %.4f on the fixed rows, %s, move size %d, kept %s",
                    generation + 1, config.search.generations, record["fixed_kl"],
                    "replaced" if record["accepted"] else "kept", record["move_size"],
                    cost_text(config.search.budget_kind, record["kept"]))


def dask_runner(parameters: CompressParameters):
    """A Dask task runner: the given cluster, or a local one of single-threaded worker processes on
    127.0.0.1 (torch in each worker then uses one thread, so workers do not fight over cores)."""
    from prefect_dask import DaskTaskRunner

    if parameters.dask_address:
        return DaskTaskRunner(address=parameters.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": parameters.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


def _build_database(values: dict, store: str, data: DataRef) -> tuple[DatabaseRef, bool]:
    """One task per layer, so a crash resumes at the layer it was building; nothing runs when it was built.
    (the database, whether this run built it)."""
    plan = database_plan_task(values, store, data)
    if not plan.finished:
        for layer in range(plan.num_layers):
            database_layer_task(values, store, data, plan, layer)
    return database_finish_task(values, store, data, plan), not plan.finished


def _stage(tracker: Tracker, parent: str, name: str, work, tags: dict | None = None, record=None):
    """Run `work` inside a nested MLflow run named after the stage, with `tags`; `record(run, result)` then logs
    the stage's own work there (its digests, figures), and the run its wall time."""
    run = tracker.start(name, parent=parent, tags=tags)
    started = time.perf_counter()
    try:
        result = work()
        if record is not None and result is not None:
            record(run, result)
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.metrics(run, {"wall_s": time.perf_counter() - started})
    tracker.finish(run)
    return result


def _preset_name(parameters: CompressParameters) -> str:
    return parameters.preset_file or parameters.preset


def _registered_name(config: CompressConfig) -> str:
    return f"{readable_name(config.model)}-pruned"


def _register(tracker, parent, config, model_ref, tags, run_uri, description, stage_tags, gguf_ref=None) -> dict:
    """Register the export (and its GGUF, when made) once per run, then offer it the alias of its fraction
    (tasks.registry: it moves only to a better candidate); registered.json on the store marks it done and keeps
    the decision. A GGUF asked for after registration is logged to the run and tagged on the version then."""
    marker = store_layout.RunLayout(run_uri).registered
    if uri_io.exists(marker):
        record = json.loads(uri_io.read_bytes(marker))
        if gguf_ref is not None and record.get("gguf") != gguf_ref.uri:
            with uri_io.local_view(gguf_ref.uri) as gguf:
                tracker.add_gguf(record["name"], record["version"], parent, gguf)
            uri_io.write_bytes(marker, json.dumps({**record, "gguf": gguf_ref.uri}).encode())
        return record
    name, alias = _registered_name(config), alias_for(config.search.fraction_removed)

    def register() -> dict:
        # A crash between registering and writing the marker must not register the same model twice.
        version = tracker.registered_version(name, {"run_uri": run_uri})
        if version is None:
            with uri_io.local_view(model_ref.uri) as folder:
                version = tracker.register(parent, folder, name, tags, description)
        decision = offer_alias(tracker.client, name, version, alias)
        return {"name": name, "version": version, "alias": alias, "alias_moved": decision.moved,
                "alias_decision": decision.reason}

    def record_registration(run: str, record: dict) -> None:
        shown = {"registered_model": name, "registered_version": record["version"], "alias": alias,
                 "alias_decision": record["alias_decision"]}
        tracker.tags(run, shown)
        tracker.tags(parent, shown)

    record = _stage(tracker, parent, "register", register, stage_tags, record_registration)
    if gguf_ref is not None:
        with uri_io.local_view(gguf_ref.uri) as gguf:
            tracker.add_gguf(name, record["version"], parent, gguf)
        record["gguf"] = gguf_ref.uri
    uri_io.write_bytes(marker, json.dumps(record).encode())
    return record
