"""A compression composed once from the core's parts: what the Prefect tasks and the benches both call.

    prepare_data (data.prepared) → build_database (database.store) → compute_teacher (search.fitness)
    → generated_rows → selection_ids → compute_teacher → build_search
    → Search.run, or its generations one by one → winner_levels
    → refit_weights → post_train → export_model with export_metadata → evaluate (evaluation.held_out)

Each function takes the loaded objects (model, database, data, teacher) and the CompressConfig, never URIs of a
run: where artifacts live is the caller's business (darwinlm.core.store_layout names the places).
"""

from typing import Callable

import torch

from darwinlm.core.config import CompressConfig
from darwinlm.core.data.generated import generated_count, sample_rows, selection_rows
from darwinlm.core.data.prepared import PreparedData, prepare_data
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.refit import RefitResult, refit_genome
from darwinlm.core.database.store import Database
from darwinlm.core.database.structure import MODULE_KINDS
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.evolution import Search, SearchState
from darwinlm.core.search.finetune import finetune
from darwinlm.core.search.fitness import CompactTeacher, compute_teacher
from darwinlm.core.search.genome import Budget, Genome


def preflight(config: CompressConfig) -> None:
    """What a compression can check in seconds, before weights load or a workflow starts: the model's
    architecture is supported, its tokenizer fits it, and the text gives enough rows for every stage."""
    from darwinlm.core.model.loading import load_tokenizer

    prepare_data(config.data, load_tokenizer(config.model))


def generated_row_count(config: CompressConfig) -> int:
    """How many generated rows search.generated_share mixes among the teacher pool's rows past its fixed rows."""
    return generated_count(config.search.generated_share, config.data.teacher_pool_rows - config.search.fixed_rows)


def generated_rows(config: CompressConfig, model, tokenizer, progress: bool = False) -> torch.Tensor | None:
    """The rows of text the dense `model` writes itself that the search's selection mixes in (data.generated),
    None when search.generated_share gives none. Seeded by data.seed, not the search's: every search seed of a
    model selects on the same text, which is made once and stored (darwinlm.core.store_layout.generated_rows)."""
    count = generated_row_count(config)
    return sample_rows(model, tokenizer, count, config.data.seq_len, config.data.seed, progress) if count else None


def selection_ids(config: CompressConfig, data: PreparedData, generated: torch.Tensor | None) -> torch.Tensor | None:
    """The rows the search's selection draws from: the teacher pool past its fixed rows with the `generated`
    rows spread among them (None without generated rows: the search then draws from the teacher pool itself)."""
    if generated is None:
        return None
    return selection_rows(data.teacher_pool_ids[config.search.fixed_rows:], generated)


def selection_teacher(config: CompressConfig, model, tokenizer, data: PreparedData, progress: bool = False
                      ) -> CompactTeacher | None:
    """The dense `model`'s teacher on selection_ids, made here and now (the Prefect tasks store both parts)."""
    ids = selection_ids(config, data, generated_rows(config, model, tokenizer, progress))
    return None if ids is None else compute_teacher(model, ids, config.teacher_top_k)


def build_search(config: CompressConfig, assembly: LiveAssembly, data: PreparedData, teacher: CompactTeacher,
                 selection: CompactTeacher | None = None, state_uri: str | None = None, progress: bool = False,
                 tokenizer=None) -> Search:
    """The search of `config` on `assembly` (the dense model and its database; candidates are swapped into it),
    scored against `teacher` (the dense model's, on data.teacher_pool_ids: the fixed rows and the start's slopes)
    and, in selection, against `selection` (the dense model's on selection_ids; needed when search.generated_share
    gives generated rows), finetuning inside selection on data.train_ids; its state is saved at `state_uri` after
    every generation (None: not saved). `tokenizer`: the model's, for a latency budget measured in llama.cpp."""
    if selection is None and generated_row_count(config):
        raise DarwinLMError(f"search.generated_share {config.search.generated_share} mixes generated rows into "
                            "selection, but no selection teacher was given",
                            "pass compression.selection_teacher(...) as `selection`")
    return Search(assembly, teacher, data.train_ids, config.search, state_uri=state_uri, progress=progress,
                  tokenizer=tokenizer, selection_pool=selection)


def start_needs_a_model(config: CompressConfig) -> bool:
    """Whether the genome at 0 generations needs the live model: a latency budget's table, or the start's KL
    on fixed rows. A uniform start counts parameters from the database alone."""
    return config.search.budget_kind == "latency" or config.search.start != "uniform"


def winner_levels(config: CompressConfig, database: Database, state: SearchState | None,
                  live_search: Callable[[], Search]) -> tuple[int, ...]:
    """The levels a compression ships: the final parent of its finished search or, with 0 generations, the
    search's start: the saved state's when the start was chosen and saved already (a state at generation 0),
    else uniform from the database alone, or `live_search()` built to choose it."""
    generations = config.search.generations
    if state is not None and state.config_digest != config.search.digest:
        raise DarwinLMError("the saved search state belongs to another search config",
                            "use a new run location, or delete the state to start over")
    if generations and (state is None or state.generation < generations):
        raise DarwinLMError(f"the search has not finished its {generations} generations",
                            "run the search generations first")
    if state is not None:
        return tuple(state.parent)
    if start_needs_a_model(config):
        return live_search().choose_start()[0]
    return Budget.from_database(database, fraction_removed=config.search.fraction_removed,
                                kind=config.search.budget_kind, seq_len=config.data.seq_len).uniform()


def refit_weights(config: CompressConfig, model, database: Database, genome: Genome, data: PreparedData
                  ) -> RefitResult:
    """The chosen levels' weights refitted on inputs propagated through the pruned layers below, pulled
    `post_train.refit_dense_weight` of the way to the dense model's outputs (database.refit). `model` is dense."""
    return refit_genome(model, database, genome.assignment(), data.calibration_ids,
                        dense_weight=config.post_train.refit_dense_weight)


def post_train(assembly: LiveAssembly, genome: Genome, rows: torch.Tensor, config: CompressConfig,
               teacher: CompactTeacher | None = None, progress: bool = False) -> list[float]:
    """Assemble the winner afresh (from the assembly's database: a RefitDatabase gives the refitted weights) and
    finetune it on `rows` with the post-training schedule (warmup + cosine, distillation from `teacher`)."""
    assembly.apply(genome.assignment(), rebuild=True)
    if rows.shape[0] == 0:
        return []
    return finetune(assembly.model, rows, config.post_train.finetune, teacher=teacher, progress=progress)


def export_metadata(database: Database, assignment: dict[tuple[int, str], int], kept_params: int, **extra) -> dict:
    """What an exported pruned model records about itself (darwinlm.json, the model card, the GGUF): its
    database, base model, levels per module kind and layer, kept and dense block parameters, plus `extra`
    (a compression adds its genome and config digests, post-training losses and whether it was refitted)."""
    layers = range(database.manifest["base_model"]["num_layers"])
    return {"database": database.digest, "base_model_digest": database.manifest["base_model"]["digest"],
            "levels": {kind: [assignment[(layer, kind)] for layer in layers] for kind in MODULE_KINDS},
            "kept_block_params": kept_params, "dense_block_params": database.manifest["dense_params"], **extra}
