"""Prefect tasks: one per stage of a compression, each a thin wrapper around darwinlm.core.

A task reads typed references (darwinlm.tasks.refs), calls the core, writes its artifact with a manifest (or a
file that plays that role) last, and returns references — never tensors. A task whose artifact already exists
returns it without work (darwinlm.tasks.stored).
"""

import dataclasses
import json

import torch
from prefect import get_run_logger, task
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from darwinlm.core import store_layout, uri_io
from darwinlm.core.compression import (build_search, export_metadata, generated_row_count, generated_rows, post_train,
                                       refit_weights, selection_ids, start_needs_a_model, winner_levels)
from darwinlm.core.config import CompressConfig, config_from_dict
from darwinlm.core.data.generated import TEMPERATURE, TOP_P, document_start_token
from darwinlm.core.data.prepared import prepare_data
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.refit import RefitDatabase, RefitResult
from darwinlm.core.database.store import (Database, DatabaseBuilder, database_root, layer_record_uri, manifest_uri,
                                          model_digest)
from darwinlm.core.data.windows import TEST, WINDOWS_PROTOCOL
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.metrics import greedy_continuation, prefill_tokens_per_second
from darwinlm.core.search.fitness import CompactTeacher, compute_teacher
from darwinlm.core.search.genome import Budget, Genome
from darwinlm.core.export.model_card import write_model_card
from darwinlm.core.model.loading import load_config, load_model
from darwinlm.core.evaluation.held_out import (evaluate, evaluate_dense, evaluation_table, validation_figures,
                                              zero_shot_scores)
from darwinlm.core.search.evolution import Search, SearchState, rank
from darwinlm.core.store_layout import RunLayout
from darwinlm.tasks.refs import DatabasePlan, DatabaseRef, DataRef, GenomeRef, GgufRef, ModelRef, RefitRef
from darwinlm.tasks.stored import LiveObjects, built_unless_marked, read_json, stored_or_computed, write_json

SAMPLE_PROMPT_TOKENS = 24
# The compression's evaluation is what it reports: it reads the test windows, never used to choose anything.
REPORTED_SPLIT = TEST

# Storage can fail transiently (a bucket, a network file system); compute failures are not retried.
IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10])


def _config(values: dict) -> CompressConfig:
    return config_from_dict(values)  # the same strict parser presets go through


def _dense_model_and_data(config: CompressConfig):
    """A fresh dense model, its tokenizer, and the run's rows (tokenizing is seconds; cheaper than storing)."""
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    return model, tokenizer, prepare_data(config.data, tokenizer)


# One per process: a flow process, or a Dask worker that keeps its search between candidates.
live_objects = LiveObjects()


@task(name="prepare-data", **IO_RETRIES)
def prepare_data_task(config_values: dict, run_uri: str, store_uri: str | None = None) -> DataRef:
    """Record the data split and its digests for the run (tokenization itself is redone where needed), and
    the store whose shared dense-model artifacts it uses."""
    def record() -> DataRef:
        model, tokenizer, data = _dense_model_and_data(_config(config_values))
        return DataRef(split=data.split.describe(), split_digest=data.split.digest,
                       calibration_digest=data.calibration_digest, base_model_digest=model_digest(model),
                       store_uri=store_uri, eval_windows=data.windows_record())

    return stored_or_computed(RunLayout(run_uri).data, record, DataRef)


def _run_data(run_uri: str) -> DataRef:
    """The run's data record (prepare_data_task writes it before any later stage runs)."""
    return DataRef.model_validate(read_json(RunLayout(run_uri).data))


def _dense_work_key(config: CompressConfig, data_ref: DataRef, model, inputs: dict) -> str:
    """Names work of the dense model by all its result depends on: the model's weights, the precision and
    kind of device it ran in, and `inputs` (JSON: tensors as their digests)."""
    values = {"model": data_ref.base_model_digest, "dtype": config.dtype,
              "device": next(model.parameters()).device.type, **inputs}
    return uri_io.sha256(json.dumps(values, sort_keys=True).encode())[:16]


def _ids_digest(ids: torch.Tensor) -> str:
    return uri_io.sha256(json.dumps(list(ids.shape)).encode() + ids.numpy().tobytes())


def _teacher(config: CompressConfig, run_uri: str, model, ids: torch.Tensor, run_local: str | None
             ) -> CompactTeacher:
    """The dense `model`'s compact teacher on the rows `ids`: stored once per model, rows, top-k, dtype and
    device kind under the store's teachers/, where every run that needs it reads it. A run prepared before
    teachers were shared keeps its own at `run_local` (a URI under the run root; None: not stored)."""
    data_ref = _run_data(run_uri)
    uri = run_local
    if data_ref.store_uri is not None:
        key = _dense_work_key(config, data_ref, model, {"rows": _ids_digest(ids), "top_k": config.teacher_top_k})
        uri = store_layout.teacher(data_ref.store_uri, key)
    if uri is not None and uri_io.exists(uri):
        get_run_logger().info("dense teacher of %d rows read from %s", ids.shape[0], uri)
        return CompactTeacher.from_bytes(uri_io.read_bytes(uri))
    teacher = compute_teacher(model, ids, config.teacher_top_k)
    if uri is not None:
        uri_io.write_bytes(uri, teacher.to_bytes())
    return teacher


def _generated_rows(config: CompressConfig, run_uri: str, model, tokenizer) -> torch.Tensor | None:
    """The rows of text the dense model writes for the search's selection (compression.generated_rows): made
    once per model, dtype, device kind and sampling request under the store's generated/ (minutes on a CPU), then
    read by every run, seed and worker that needs them."""
    data_ref = _run_data(run_uri)
    count = generated_row_count(config)
    if not count:
        return None
    if data_ref.store_uri is None:  # a run prepared before stores were shared makes them in place
        return generated_rows(config, model, tokenizer, progress=True)
    key = _dense_work_key(config, data_ref, model, {
        "generated_rows": count, "seq_len": config.data.seq_len, "seed": config.data.seed,
        "sampling": [TEMPERATURE, TOP_P], "start_token": document_start_token(tokenizer)})
    uri = store_layout.generated_rows(data_ref.store_uri, key)
    if uri_io.exists(uri):
        return load_safetensors(uri_io.read_bytes(uri))["input_ids"]
    get_run_logger().info("sampling %d rows of %d tokens from the dense model for the search's selection",
                          count, config.data.seq_len)
    rows = generated_rows(config, model, tokenizer, progress=True)
    uri_io.write_bytes(uri, save_safetensors({"input_ids": rows.contiguous()}))
    return rows


def _database_root(config: CompressConfig, store_uri: str, data_ref: DataRef) -> str:
    return database_root(store_layout.databases(store_uri), data_ref.base_model_digest,
                         data_ref.calibration_digest, config.database)


def _database_builder(config: CompressConfig, store_uri: str, data_ref: DataRef) -> DatabaseBuilder:
    def builder() -> DatabaseBuilder:
        model, tokenizer, data = _dense_model_and_data(config)
        return DatabaseBuilder(model, data.calibration_ids, store_layout.databases(store_uri),
                               calibration_digest=data.calibration_digest, config=config.database,
                               base_model_digest=data_ref.base_model_digest)

    return live_objects.get(_database_root(config, store_uri, data_ref), builder)


@task(name="plan-database", **IO_RETRIES)
def database_plan_task(config_values: dict, store_uri: str, data_ref: DataRef) -> DatabasePlan:
    """Where the content-addressed database of this model + calibration + config lives, and how many layers
    it has; `finished` when it was built before (then no layer task needs to run)."""
    config = _config(config_values)
    root = _database_root(config, store_uri, data_ref)
    return DatabasePlan(uri=root, num_layers=load_config(config.model).num_hidden_layers,
                        finished=uri_io.exists(manifest_uri(root)))


@task(name="database-layer", task_run_name="database-layer-{layer}", **IO_RETRIES)
def database_layer_task(config_values: dict, store_uri: str, data_ref: DataRef, plan: DatabasePlan,
                        layer: int) -> dict:
    """Prune one layer at every level (or find it written by an earlier, crashed run)."""
    built = built_unless_marked(layer_record_uri(plan.uri, layer), lambda: _database_builder(
        _config(config_values), store_uri, data_ref).build_layer(layer))
    return {"layer": layer, "built": built}


@task(name="finish-database", **IO_RETRIES)
def database_finish_task(config_values: dict, store_uri: str, data_ref: DataRef, plan: DatabasePlan) -> DatabaseRef:
    """Write the manifest once every layer is there (without loading the model when they all were built)."""
    if built_unless_marked(manifest_uri(plan.uri), lambda: _database_builder(
            _config(config_values), store_uri, data_ref).finish()):
        get_run_logger().info("database %s ready", plan.uri)
    live_objects.release(plan.uri)
    return DatabaseRef(uri=plan.uri, digest=Database.open(plan.uri).digest)


def _search(config: CompressConfig, run_uri: str, database_ref: DatabaseRef) -> Search:
    """The live search of a run in this process (a flow process, or a Dask worker that keeps it between
    candidates). The teacher is stored (once per dense model and rows, see _teacher), so workers read it."""
    def search() -> Search:
        model, tokenizer, data = _dense_model_and_data(config)
        layout = RunLayout(run_uri)
        teacher = _teacher(config, run_uri, model, data.teacher_pool_ids, layout.own_teacher)  # dense: before pruning
        selection_rows = selection_ids(config, data, _generated_rows(config, run_uri, model, tokenizer))
        selection = None if selection_rows is None else _teacher(config, run_uri, model, selection_rows, None)
        return build_search(config, LiveAssembly(model, Database.open(database_ref.uri)), data, teacher, selection,
                            state_uri=layout.search_state, tokenizer=tokenizer)

    return live_objects.get(run_uri, search)


def _saved_search_state(run_uri: str) -> SearchState | None:
    uri = RunLayout(run_uri).search_state
    return SearchState.from_json(uri_io.read_bytes(uri)) if uri_io.exists(uri) else None


def _generation_number(parameters: dict) -> int:
    """Generations are counted from 1 wherever a user reads them (task names, logs, MLflow steps, the progress
    artifact: generations completed, the start being 0); the core's records index them from 0."""
    return parameters["generation"] + 1


def _candidate_run_name(parameters: dict) -> str:
    return f"candidate-g{_generation_number(parameters)}-s{parameters['stage_index']}-{parameters['index']}"


def _select_run_name(parameters: dict) -> str:
    return f"select-g{_generation_number(parameters)}-s{parameters['stage_index']}"


def _generation_run_name(parameters: dict) -> str:
    return f"generation-{_generation_number(parameters)}"


@task(name="choose-start", task_run_name="choose-start", **IO_RETRIES)
def search_start_task(config_values: dict, run_uri: str, database_ref: DatabaseRef) -> dict:
    """The search's first parent (search.start: uniform, the informed start, or the better of the two on the
    fixed rows), chosen once and saved as the search state at generation 0, which the generations and a
    0-generation run's genome then read. Returns the choice's record with the start's fixed-row KL, and logs
    both KLs: the choice can take minutes (the informed start's KL slopes) and is worth seeing."""
    saved = _saved_search_state(run_uri)
    if saved is not None:
        return saved.start
    search = _search(_config(config_values), run_uri, database_ref)
    state = search.load_or_start()
    search.save(state)
    record = state.start
    if "uniform_kl" in record:
        get_run_logger().info(
            "search start: %s, fixed-row KL to dense %.4f (informed start) vs %.4f (uniform)",
            record["chosen"], record["informed_kl"], record["uniform_kl"])
    else:
        get_run_logger().info("search start: %s (set by search.start), fixed-row KL to dense %.4f",
                              record["chosen"], record["fixed_kl"])
    return record


@task(name="evaluate-candidate", task_run_name=_candidate_run_name)
def evaluate_candidate_task(config_values: dict, run_uri: str, database_ref: DatabaseRef, generation: int,
                            stage_index: int, index: int, levels: list) -> list[float]:
    """One candidate's short finetune and per-row fitness, wherever the task runner puts it (a Dask worker loads
    the model, database and teacher on its first candidate and keeps them)."""
    return _search(_config(config_values), run_uri, database_ref).evaluate_in_stage(generation, stage_index, levels)


@task(name="select", task_run_name=_select_run_name)
def select_task(config_values: dict, run_uri: str, database_ref: DatabaseRef, generation: int, stage_index: int,
                candidates: list, distributed: bool = False) -> list:
    """One finetune-and-select stage of one generation: [(fitness, levels, per-row fitness)] best first.
    `distributed`: each candidate is its own task on the flow's task runner (Dask), else all run here, one after
    another. Not persisted: the generation is the unit of resumption, and its rows are seeded, so a re-run selects
    the same."""
    if distributed:
        futures = [evaluate_candidate_task.submit(config_values, run_uri, database_ref, generation, stage_index,
                                                  index, list(levels)) for index, levels in enumerate(candidates)]
        ranked = rank(candidates, [future.result() for future in futures])
    else:
        ranked = _search(_config(config_values), run_uri, database_ref).select(generation, stage_index, candidates)
    return [(fitness, list(levels), rows) for fitness, levels, rows in ranked]


@task(name="search-generation", task_run_name=_generation_run_name, **IO_RETRIES)
def search_generation_task(config_values: dict, run_uri: str, database_ref: DatabaseRef, generation: int,
                           distributed: bool = False) -> dict:
    """Generation `generation` of the search, each stage its own task; writes search_state.json. A generation
    the saved state already holds (from an earlier, crashed run) returns its record without work."""
    saved = _saved_search_state(run_uri)
    if saved is not None and saved.generation > generation:
        return saved.history[generation]
    search = _search(_config(config_values), run_uri, database_ref)
    state = search.load_or_start()
    if state.generation != generation:
        raise DarwinLMError(f"search at {run_uri} is at generation {state.generation}, asked for {generation}",
                            "run generations in order")
    state = search.generation(state, select=lambda g, i, candidates: [
        (fitness, tuple(levels), rows) for fitness, levels, rows in select_task(
            config_values, run_uri, database_ref, g, i, [list(c) for c in candidates], distributed)])
    search.save(state)
    return state.history[-1]


@task(name="finish-search", **IO_RETRIES)
def search_finish_task(config_values: dict, run_uri: str, database_ref: DatabaseRef) -> GenomeRef:
    """The winner (genome.json, written last) from the final search state."""
    genome = stored_or_computed(RunLayout(run_uri).genome,
                                lambda: _winner(_config(config_values), run_uri, database_ref), GenomeRef)
    live_objects.release(run_uri)
    return genome


def _winner(config: CompressConfig, run_uri: str, database_ref: DatabaseRef) -> GenomeRef:
    database = Database.open(database_ref.uri)
    state = _saved_search_state(run_uri)  # with 0 generations, the start choose-start saved (if it ran)
    try:
        levels = winner_levels(config, database, state, lambda: _search(config, run_uri, database_ref))
    except DarwinLMError as error:
        raise DarwinLMError(f"{error} (run {run_uri})") from error
    if not config.search.generations and start_needs_a_model(config):
        get_run_logger().info("0 generations: the search's start is the genome (%s)", config.search.start)
    params = Budget.from_database(database, fraction_removed=config.search.fraction_removed)  # for the record
    genome = Genome(levels, database.digest)
    return GenomeRef(**genome.to_json(), kept_params=params.cost(genome.levels), dense_params=params.dense,
                     budget_kind=config.search.budget_kind, fitness=state.parent_fitness if state else None,
                     fixed_kl=state.parent_fixed_kl if state else None, start=state.start if state else {},
                     history=state.history if state else [])


@task(name="refit", **IO_RETRIES)
def refit_task(config_values: dict, run_uri: str, database_ref: DatabaseRef, genome_ref: GenomeRef) -> RefitRef | None:
    """Refit the winner's weights on inputs propagated through its pruned layers, pulled towards the dense
    model's outputs by `post_train.refit_dense_weight` (config `post_train.refit`); the artifact is
    refit.safetensors, written whole. None when the config turns the refit off."""
    config = _config(config_values)
    if not config.post_train.refit:
        return None
    layout = RunLayout(run_uri)
    uri = layout.refit_weights

    def refit() -> RefitRef:
        model, tokenizer, data = _dense_model_and_data(config)
        database = Database.open(database_ref.uri)
        genome = Genome.from_json({**genome_ref.model_dump(), "database": database.digest})
        result = refit_weights(config, model, database, genome, data)
        uri_io.write_bytes(uri, result.to_bytes())
        errors = list(result.errors.values())
        return RefitRef(uri=uri, error_before=sum(before for before, _ in errors) / max(1, len(errors)),
                        error_after=sum(after for _, after in errors) / max(1, len(errors)))

    # refit.json, written after the weights, is the marker and the record: a rerun reads it, not the weights
    return stored_or_computed(layout.refit_record, refit, RefitRef)


@task(name="post-train-and-export", **IO_RETRIES)
def post_train_task(config_values: dict, run_uri: str, database_ref: DatabaseRef, genome_ref: GenomeRef,
                    refit_ref: RefitRef | None = None) -> ModelRef:
    """Post-train the winner (warmup + cosine, distillation), from its refitted weights when there are any,
    and export it; the export is the artifact (its config.json is written last)."""
    model_uri = RunLayout(run_uri).model
    built_unless_marked(uri_io.join(model_uri, "config.json"), lambda: _post_train_and_export(
        _config(config_values), run_uri, database_ref, genome_ref, refit_ref, model_uri))
    return ModelRef(uri=model_uri)


def _post_train_and_export(config: CompressConfig, run_uri: str, database_ref: DatabaseRef, genome_ref: GenomeRef,
                           refit_ref: RefitRef | None, model_uri: str) -> None:
    model, tokenizer, data = _dense_model_and_data(config)
    teacher = None
    if config.post_train.finetune.distill_weight > 0:
        teacher = _teacher(config, run_uri, model, data.post_train_ids, None)
    database = Database.open(database_ref.uri)
    if refit_ref is not None:  # the chosen levels load the refitted weights; the digest stays the database's
        database = RefitDatabase(database, RefitResult.from_bytes(uri_io.read_bytes(refit_ref.uri)))
    assembly = LiveAssembly(model, database)
    genome = Genome.from_json({**genome_ref.model_dump(), "database": database.digest})
    losses = post_train(assembly, genome, data.post_train_ids, config, teacher=teacher, progress=True)
    metadata = export_metadata(database, genome.assignment(), assembly.kept_params(), genome=genome.digest,
                               base_model=config.model, config_digest=config.digest, post_train_losses=losses,
                               refit=refit_ref is not None)
    # the exporters import transformers: not at module import, which must not read the hub settings early
    from darwinlm.core.export.huggingface import export_model

    export_model(model, tokenizer, model_uri, metadata=metadata)


@task(name="export-gguf", **IO_RETRIES)
def gguf_task(config_values: dict, run_uri: str, model_ref: ModelRef) -> GgufRef | None:
    """The exported model as one GGUF file for llama.cpp (config `export.gguf`), made from the HF folder, so a
    finished run asked for a GGUF later gets one without redoing anything; None when not configured."""
    quant = _config(config_values).export.gguf
    if quant is None:
        return None
    uri = RunLayout(run_uri).gguf(quant)

    def export() -> None:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        from darwinlm.core.export.gguf import export_gguf

        with uri_io.local_view(model_ref.uri) as folder:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        info = read_json(uri_io.join(model_ref.uri, "darwinlm.json"))
        export_gguf(model, tokenizer, uri, quant=quant,
                    metadata={"name": f"{info.get('base_model', 'model')}-darwinlm", **info})

    built_unless_marked(uri, export)  # the GGUF is one file, written whole
    return GgufRef(uri=uri, quant=quant)


@task(name="evaluate", **IO_RETRIES)
def evaluate_task(config_values: dict, run_uri: str, model_ref: ModelRef) -> dict:
    """Dense vs pruned: parameters, held-out perplexity, KL, zero-shot accuracy, prefill speed."""
    uri = RunLayout(run_uri).evaluation
    if uri_io.exists(uri):
        return read_json(uri)
    results = _evaluate(_config(config_values), run_uri, model_ref)
    write_model_card(model_ref.uri, evaluation=results)  # the card now shows before/after figures
    write_json(uri, results)
    return results


def _evaluate(config: CompressConfig, run_uri: str, model_ref: ModelRef) -> dict:
    from transformers import AutoModelForCausalLM

    dense, tokenizer, data = _dense_model_and_data(config)
    with uri_io.local_view(model_ref.uri) as folder:
        pruned = AutoModelForCausalLM.from_pretrained(folder).eval()
    pruned = pruned.to(next(dense.parameters()).device)
    dense_row, teacher = _dense_evaluation(config, _run_data(run_uri), dense, tokenizer, data)
    pruned_row = evaluate(pruned, data, teacher, progress=True, split=REPORTED_SPLIT)
    pruned_row["params"] = sum(p.numel() for p in pruned.parameters())
    pruned_row.update(_zero_shot(pruned, tokenizer, data, config))
    results = evaluation_table(dense_row, pruned_row, data.split)  # with the sets' labels, for the card
    results["validation"] = validation_figures(pruned, data, progress=True)  # what the registry's alias reads
    windows = next(iter(data.eval_windows(REPORTED_SPLIT).values()))
    speed = prefill_tokens_per_second([dense, pruned], windows[:2])
    results["dense"]["prefill_tokens_per_s"], results["pruned"]["prefill_tokens_per_s"] = speed
    prompt = windows[0, :SAMPLE_PROMPT_TOKENS]  # held-out text: neither model was fitted on it
    results["sample"] = {"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                         **{name: greedy_continuation(model, tokenizer, prompt)
                            for name, model in (("dense", dense), ("pruned", pruned))}}
    return results


def _dense_evaluation(config: CompressConfig, data_ref: DataRef, dense, tokenizer, data
                      ) -> tuple[dict, CompactTeacher]:
    """The dense model's evaluation row (perplexities, KL, parameters, zero-shot scores) and the teacher the
    pruned model's KL is taken against. It depends only on the dense model, the held-out rows and the
    evaluation settings, so it is stored once under the store's dense-evaluations/ (the row written after the
    teacher, as its marker) and read by every later run that asks for the same; a run prepared before it was
    shared computes it."""
    from importlib.metadata import version

    folder = None
    if data_ref.store_uri is not None:
        windows = {name: _ids_digest(ids) for name, ids in data.eval_windows(REPORTED_SPLIT).items()}
        lm_eval = version("lm_eval") if config.evaluate.tasks else None  # its scoring may change between versions
        # The windows protocol and split are named as well as the windows' digests: a row measured under an
        # older protocol (the first contiguous windows) must never be read as this one's.
        key = _dense_work_key(config, data_ref, dense, {
            "split": data_ref.split_digest, "windows": windows, "windows_protocol": WINDOWS_PROTOCOL,
            "windows_split": REPORTED_SPLIT, "top_k": config.teacher_top_k,
            "evaluate": dataclasses.asdict(config.evaluate), "lm_eval": lm_eval})
        folder = store_layout.dense_evaluation(data_ref.store_uri, key)
        if uri_io.exists(uri_io.join(folder, store_layout.EVALUATION)):
            get_run_logger().info("dense model's evaluation read from %s (an earlier run's)", folder)
            teacher = CompactTeacher.from_bytes(uri_io.read_bytes(uri_io.join(folder, store_layout.TEACHER)))
            return read_json(uri_io.join(folder, store_layout.EVALUATION)), teacher
    row, teacher = evaluate_dense(dense, data, config.teacher_top_k, progress=True, split=REPORTED_SPLIT)
    row["params"] = sum(p.numel() for p in dense.parameters())
    row.update(_zero_shot(dense, tokenizer, data, config))
    if folder is not None:
        uri_io.write_bytes(uri_io.join(folder, store_layout.TEACHER), teacher.to_bytes())
        write_json(uri_io.join(folder, store_layout.EVALUATION), row)
    return row, teacher


def _zero_shot(model, tokenizer, data, config: CompressConfig) -> dict:
    return zero_shot_scores(model, tokenizer, data.split, config.evaluate.tasks, config.evaluate.task_limit)
