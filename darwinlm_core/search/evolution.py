"""The evolutionary search over per-module levels, with training-aware multi-stage selection (DarwinLM).

The search starts from the better, on fixed rows, of the uniform genome and the informed start (start.py:
the budget-exact least summed per-level error). Each generation: the parent makes `offspring` distinct
mutants of budget-neutral level switches, as many as the move size (adapted by the 1/5 success rule); they go
through stages, each stage sampling fresh fitness rows (and finetune rows) from seeded generators, giving
every candidate a short finetune, measuring its KL to the dense teacher on the same rows, and keeping the
best `survivors`. The parent joins the last stage (elitism), so it is replaced only by a candidate that beats
it on the same rows after the same finetune, by `accept_z` standard errors of their paired per-row difference:
on SmolLM2 the KL difference of two neighbouring genomes swings by ~0.08 per 512-token row while a switch
moves the mean by 0.005–0.05, so without that margin most replacements are row-draw luck. All candidates are
assembled in one live model (LiveAssembly).

Ideas measured no better than this plain loop (informed steps, confirmation rows, surrogate screening, skipping
each row's first positions) were deleted; tag lab-knobs-2026-12-04 holds them, experiments/ holds the notes.

The first `fixed_rows` rows of the teacher pool are never selected on: the parent's KL on them, every
generation, is the trajectory a user watches (it changes only when the parent does, and only by real gains).
Selection draws from a selection pool: the teacher pool's other rows, with text the dense model wrote itself
spread among them (search.generated_share; data/generated.py says why). The teacher pool is real text only,
for the fixed rows and the informed start's KL slopes.

The SearchState is written after every generation; running again with the same config resumes after the
last finished generation and reaches the same final genome as an uninterrupted run, because mutation draws
from a saved RNG state and every stage's rows come from a generator seeded by (seed, generation, stage).
"""

import dataclasses
import hashlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from tqdm.auto import tqdm

from darwinlm.core import uri_io
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.search.finetune import FinetuneConfig, finetune
from darwinlm.core.search.fitness import CompactTeacher, kl_per_row
from darwinlm.core.search.genome import BUDGET_KINDS, Budget, Genome, adapt_move_size, module_keys, offspring
from darwinlm.core.search.latency import LATENCY_ENGINES, load_or_measure
from darwinlm.core.search.prefix import PrefixReuse
from darwinlm.core.search.start import allocate, database_errors, kl_weights

START_KINDS = ("best", "informed", "uniform")
SUCCESS_WINDOW = 5  # generations over which the 1/5 rule counts parent replacements
# The informed start's levels stay within this many steps of uniform: the DP trusts the stored per-level errors
# only near where its KL slopes were measured (at uniform).
START_RADIUS = 2


@dataclass(frozen=True)
class StageConfig:
    survivors: int
    fitness_tokens: int
    finetune_tokens: int = 0


# Options added to SearchConfig after searches were saved, each with the value that searches as they did then.
SEARCH_OPTIONS_BEFORE = {"latency_engine": "torch", "latency_threads": 0, "generated_share": 0.0}


@dataclass(frozen=True)
class SearchConfig:
    fraction_removed: float = 0.5
    budget_kind: str = "params"  # or "flops", or "latency" (measured where the model runs, see latency.py)
    latency_engine: str = "torch"  # where a latency budget is measured: torch on this device, or llama.cpp
    latency_threads: int = 0  # llama.cpp's threads for a latency table (0: as many as torch uses)
    generations: int = 50
    offspring: int = 16
    stages: tuple[StageConfig, ...] = (StageConfig(8, 1024, 10_000), StageConfig(4, 2048, 50_000),
                                       StageConfig(2, 4096, 100_000), StageConfig(1, 8192, 200_000))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0
    batch_size: int = 4
    fixed_rows: int = 4  # teacher-pool rows never selected on: the start choice and the KL trajectory
    start: str = "best"  # uniform, informed (least summed per-level error), or best of the two on fixed rows
    start_slope_tokens: int = 0  # > 0: weigh each module's errors by its KL slope, measured on this many
    move_size: int = 3  # the most level switches per mutant, at the start; the 1/5 success rule then moves it
    min_move_size: int = 1  # a move too small to change KL by more than the last stage resolves only costs time
    # The parent is replaced only when the best challenger beats it on the last stage's rows by this many
    # standard errors of their paired per-row difference, so a lucky row draw keeps the parent; 0 is DarwinLM's
    # rule, and measured worst (experiments/2026-11-30-acceptance-margin/note.md).
    accept_z: float = 1.0
    # Of the rows selection draws from, this share is text sampled from the dense model itself (data/generated.py
    # says why); the fixed rows and the start's slopes stay real text. compression.build_search composes the pool.
    generated_share: float = 0.5

    def __post_init__(self):
        survivors = [stage.survivors for stage in self.stages]
        if not self.stages or survivors[-1] != 1 or survivors != sorted(survivors, reverse=True):
            raise DarwinLMError(f"stage survivors {survivors} must shrink to exactly 1 in the last stage")
        if survivors[0] > self.offspring or self.generations < 0 or self.offspring < 1:
            raise DarwinLMError(f"first stage keeps {survivors[0]} of {self.offspring} offspring",
                                "keep at most as many as are made, with offspring ≥ 1 and generations ≥ 0")
        if self.budget_kind not in BUDGET_KINDS:
            raise DarwinLMError(f"unknown budget_kind '{self.budget_kind}'", f"use one of {', '.join(BUDGET_KINDS)}")
        if any(stage.fitness_tokens < 1 or stage.finetune_tokens < 0 for stage in self.stages):
            raise DarwinLMError("every stage needs fitness_tokens ≥ 1 and finetune_tokens ≥ 0")
        if self.latency_engine not in LATENCY_ENGINES or self.latency_threads < 0:
            raise DarwinLMError(f"latency_engine '{self.latency_engine}' with latency_threads {self.latency_threads}",
                                f"use an engine of {', '.join(LATENCY_ENGINES)} and threads ≥ 0 (0: torch's count)")
        if self.start not in START_KINDS:
            raise DarwinLMError(f"unknown search start '{self.start}'", f"use one of {', '.join(START_KINDS)}")
        if (self.fixed_rows < 1 or self.move_size < 1 or self.start_slope_tokens < 0
                or self.accept_z < 0 or not 1 <= self.min_move_size <= self.move_size):
            raise DarwinLMError("search needs fixed_rows ≥ 1, 1 ≤ min_move_size ≤ move_size, "
                                "start_slope_tokens ≥ 0 and accept_z ≥ 0")
        if not 0 <= self.generated_share < 1:
            raise DarwinLMError(f"search.generated_share {self.generated_share} is not a share of the selection rows",
                                "use a value from 0 (real text only) up to, not including, 1")

    @property
    def target_label(self) -> str:
        """What is removed, for run names: "−50%" of parameters, or e.g. "−50% latency (llama.cpp)"."""
        label = f"−{self.fraction_removed:.0%}"
        if self.budget_kind == "latency":
            return f"{label} latency ({self.latency_engine})"
        return label if self.budget_kind == "params" else f"{label} {self.budget_kind}"

    def address_values(self) -> dict:
        """The fields that name a search (its state, its run): an option added later enters only when it differs
        from the behaviour before it existed, so searches and runs saved then keep their names."""
        values = asdict(self)
        for name, before in SEARCH_OPTIONS_BEFORE.items():
            if values[name] == before:
                del values[name]
        return values

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.address_values(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SearchState:
    config_digest: str
    database: str
    generation: int  # generations finished
    parent: list[int]
    parent_fitness: float | None
    rng_state: list
    history: list[dict]
    move_size: int = 3
    parent_fixed_kl: float | None = None  # the parent's KL on the fixed rows
    start: dict = field(default_factory=dict)  # how the first parent was chosen, the KL of each option, its own

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "SearchState":
        # Fields a newer or older version wrote and this one lacks are dropped: such a state then fails the
        # config-digest check in Search.load_or_start with its one-line error, not with a TypeError here.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in json.loads(data).items() if key in known})


def _rows(pool_size: int, tokens: int, seq_len: int, generator: torch.Generator, reserved: int = 0) -> torch.Tensor:
    """Indices of ceil(tokens / seq_len) distinct rows of a pool past its first `reserved`, drawn with
    `generator`."""
    count = -(-tokens // seq_len)
    if count > pool_size - reserved:
        kept = f" ({reserved} more are kept fixed)" if reserved else ""
        raise DarwinLMError(f"{count} rows of {seq_len} tokens are needed but the pool has {pool_size - reserved}"
                            f" to draw from{kept}",
                            "lower the stage's tokens or give the search more calibration/training text")
    return torch.randperm(pool_size - reserved, generator=generator)[:count] + reserved


class Search:
    """Runs generations on a LiveAssembly; `run()` resumes from `state_uri` when a state is there."""

    def __init__(self, assembly: LiveAssembly, teacher_pool: CompactTeacher, train_pool: torch.Tensor,
                 config: SearchConfig, state_uri: str | None = None, progress: bool = False, tokenizer=None,
                 selection_pool: CompactTeacher | None = None):
        """`teacher_pool`: real text, its first fixed_rows the fixed rows, the rest what the start's KL slopes
        are measured on; `selection_pool`: the rows selection draws from (None: the teacher pool past its fixed
        rows; compression.build_search passes them mixed with generated text). `tokenizer`: the model's, needed
        only for a latency budget measured in llama.cpp (its GGUFs carry it)."""
        self.assembly, self.teacher_pool, self.train_pool = assembly, teacher_pool, train_pool
        self.config, self.state_uri, self.progress = config, state_uri, progress
        database = assembly.database
        seq_len = teacher_pool.input_ids.shape[1]
        latency = None
        if config.budget_kind == "latency":  # measured once per database, device and row shape, then stored;
            # minutes of silence otherwise, so it always says what it is timing
            latency = load_or_measure(assembly, batch=config.batch_size, seq_len=seq_len, progress=True,
                                      engine=config.latency_engine, tokenizer=tokenizer,
                                      threads=config.latency_threads)
        self.budget = Budget.from_database(database, fraction_removed=config.fraction_removed,
                                           kind=config.budget_kind, seq_len=seq_len, latency=latency)
        self.database_digest = database.digest
        self.compute_s = 0.0  # time inside forward/backward passes, for the overhead figure
        self._dirty = True  # live weights may differ from what the database gives (training, fresh model)
        self.prefix = PrefixReuse(assembly.model, [layer for layer, _ in module_keys(database)], config.batch_size)
        if teacher_pool.input_ids.shape[0] <= config.fixed_rows:
            raise DarwinLMError(f"the search's teacher pool has {teacher_pool.input_ids.shape[0]} rows, and "
                                f"{config.fixed_rows} of them are kept fixed", "raise data.teacher_pool_rows")
        self.fixed_teacher = teacher_pool.rows(torch.arange(config.fixed_rows))
        self.selection_pool = selection_pool if selection_pool is not None else teacher_pool.rows(
            torch.arange(config.fixed_rows, teacher_pool.input_ids.shape[0]))
        if self.selection_pool.input_ids.shape[1] != seq_len:
            raise DarwinLMError(f"the selection pool's rows have {self.selection_pool.input_ids.shape[1]} tokens, "
                                f"the teacher pool's {seq_len}", "build both from rows of data.seq_len tokens")
        self._fixed_kl: dict[tuple[int, ...], float] = {}
        self._uniform_slopes: list[float] | None = None

    def fixed_kl(self, levels) -> float:
        """KL of `levels` (no finetune) on the fixed rows; remembered, since the parent is asked often."""
        levels = tuple(levels)
        if levels not in self._fixed_kl:
            self._fixed_kl[levels] = self.evaluate(levels, self.fixed_teacher, None)
        return self._fixed_kl[levels]

    def choose_start(self) -> tuple[tuple[int, ...], dict]:
        """The first parent: uniform, the informed start, or (start: best) whichever has less KL on the
        fixed rows. Returns it with a record of the choice."""
        uniform = self.budget.uniform()
        if self.config.start == "uniform":
            return uniform, {"chosen": "uniform"}
        weights = self.uniform_slopes()
        informed = allocate(self.budget, self.errors, weights, around=uniform, radius=START_RADIUS)
        if self.config.start == "informed":
            return informed, {"chosen": "informed", "calibrated": weights is not None}
        record = {"uniform_kl": self.fixed_kl(uniform), "informed_kl": self.fixed_kl(informed),
                  "calibrated": weights is not None}
        record["chosen"] = "informed" if record["informed_kl"] < record["uniform_kl"] else "uniform"
        return (informed if record["chosen"] == "informed" else uniform), record

    def uniform_slopes(self) -> list[float] | None:
        """The KL slopes at the uniform genome (None without start_slope_tokens): the informed start's
        weights; measured once."""
        if self._uniform_slopes is None and self.config.start_slope_tokens:
            self._uniform_slopes = self.slopes(self.budget.uniform(), -1)
        return self._uniform_slopes

    @cached_property
    def errors(self) -> list[list[float]]:
        """Every module's per-level errors (a database from before they were stored has none: it is refused
        here, when a start or step needs them, not by a uniform search)."""
        return database_errors(self.assembly.database)

    def slopes(self, levels: tuple[int, ...], *draw: int) -> list[float]:
        """Each module's KL slope at `levels` (kl_weights), measured one-shot on start_slope_tokens of the
        teacher pool past its fixed rows (real text, never the selection pool's generated rows), drawn from a
        generator seeded by (seed, *draw): the same on a resumed run."""
        generator = torch.Generator().manual_seed(hash_seed(self.config.seed, *draw))
        rows = _rows(self.teacher_pool.input_ids.shape[0], self.config.start_slope_tokens,
                     self.teacher_pool.input_ids.shape[1], generator, self.config.fixed_rows)
        teacher = self.teacher_pool.rows(rows)
        return kl_weights(levels, self.budget, self.errors, lambda moved: self.evaluate(tuple(moved), teacher, None))

    def _initial_state(self) -> SearchState:
        rng = random.Random(self.config.seed)
        parent, start = self.choose_start()
        fixed_kl = self.fixed_kl(parent)
        return SearchState(self.config.digest, self.database_digest, 0, list(parent), None,
                           _encode_rng(rng.getstate()), [], move_size=self.config.move_size,
                           parent_fixed_kl=fixed_kl, start={**start, "fixed_kl": fixed_kl})

    def load_or_start(self) -> SearchState:
        if self.state_uri is None or not uri_io.exists(self.state_uri):
            return self._initial_state()
        state = SearchState.from_json(uri_io.read_bytes(self.state_uri))
        if (state.config_digest, state.database) != (self.config.digest, self.database_digest):
            raise DarwinLMError(f"search state at {self.state_uri} belongs to another config or database",
                                "use a new run location, or delete the state to start over")
        return state

    def evaluate(self, levels: tuple[int, ...], teacher: CompactTeacher, train_rows: torch.Tensor | None) -> float:
        """Assemble `levels`, finetune briefly if rows are given, and return KL per token to the teacher."""
        return statistics.fmean(self.evaluate_rows(levels, teacher, train_rows))

    def evaluate_rows(self, levels: tuple[int, ...], teacher: CompactTeacher, train_rows: torch.Tensor | None
                      ) -> list[float]:
        """As `evaluate`, but the KL per token of each of the teacher's rows."""
        self.assembly.apply(Genome(levels, self.database_digest).assignment(), rebuild=self._dirty)
        start = time.perf_counter()
        if train_rows is not None and train_rows.numel():
            finetune(self.assembly.model, train_rows, self.config.finetune)
            self._dirty = True
            self.prefix.forget()  # the weights are no longer the levels' alone
            per_row = kl_per_row(self.assembly.model, teacher, self.config.batch_size)
        else:
            self._dirty = False
            per_row = self.prefix.kl_per_row(levels, teacher)
        self.compute_s += time.perf_counter() - start
        return per_row

    def stage_row_indices(self, generation: int, stage_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices of the fitness rows in the selection pool (and of the finetune rows in the training pool, if the
        stage trains) of one stage of one generation, drawn from a generator seeded by (seed, generation,
        stage): the same wherever and whenever it is asked."""
        stage = self.config.stages[stage_index]
        generator = torch.Generator().manual_seed(hash_seed(self.config.seed, generation, stage_index))
        fitness = _rows(self.selection_pool.input_ids.shape[0], stage.fitness_tokens,
                        self.selection_pool.input_ids.shape[1], generator)
        train = None
        if stage.finetune_tokens:
            train = _rows(self.train_pool.shape[0], stage.finetune_tokens, self.train_pool.shape[1], generator)
        return fitness, train

    def stage_rows(self, generation: int, stage_index: int) -> tuple[CompactTeacher, torch.Tensor | None]:
        """The teacher rows and finetune rows (None if the stage does not train) of one stage of one generation."""
        fitness, train = self.stage_row_indices(generation, stage_index)
        return self.selection_pool.rows(fitness), None if train is None else self.train_pool[train]

    def evaluate_in_stage(self, generation: int, stage_index: int, levels) -> list[float]:
        """One candidate's per-row fitness in one stage (what a distributed worker computes)."""
        return self.evaluate_rows(tuple(levels), *self.stage_rows(generation, stage_index))

    def select(self, generation: int, stage_index: int, candidates: list[tuple[int, ...]]
               ) -> list[tuple[float, tuple[int, ...], list[float]]]:
        """One selection stage: every candidate gets the stage's short finetune and its KL on the stage's
        rows. Returns all of them as (fitness, candidate, per-row KL), best first; the caller keeps the
        survivors."""
        teacher, train = self.stage_rows(generation, stage_index)
        per_row = {}
        for index in self.prefix.evaluation_order(candidates):  # any order gives the same figures
            per_row[index] = self.evaluate_rows(tuple(candidates[index]), teacher, train)
        return rank(candidates, [per_row[index] for index in range(len(candidates))])

    def generation(self, state: SearchState, select=None) -> SearchState:
        """One generation: mutate, select through the stages, return the next state. `select` (default
        `self.select`, same signature) lets an orchestrator run each stage as its own step."""
        select = select or self.select
        start, compute_before = time.perf_counter(), self.compute_s
        rng = random.Random()
        rng.setstate(_decode_rng(state.rng_state))
        parent = tuple(state.parent)
        candidates = offspring(parent, self.config.offspring, self.budget, rng, max_switches=state.move_size)
        stages = []
        for stage_index, stage in enumerate(self.config.stages):
            if stage_index == len(self.config.stages) - 1:
                # elitism: the parent competes in the last stage, on the same rows after the same finetune
                if parent not in candidates:
                    candidates = candidates + [parent]
            scored = [(float(f), tuple(c), list(r)) for f, c, r in select(state.generation, stage_index, candidates)]
            stages.append({"best": scored[0][0], "median": statistics.median(f for f, _, _ in scored),
                           "candidates": len(scored)})
            candidates = [c for _, c, _ in scored[: stage.survivors]]
        best_fitness, best, best_rows = scored[0]
        parent_fitness, _, parent_rows = next(entry for entry in scored if entry[1] == parent)
        # None when the parent itself ranked first: no challenger beat it, so there is no decision to measure
        z_score = None if best == parent else paired_z(best_rows, parent_rows)
        accepted = best != parent and (z_score is None or z_score <= -self.config.accept_z)
        if not accepted:
            best_fitness, best = parent_fitness, parent
        recent = [h["accepted"] for h in state.history[-(SUCCESS_WINDOW - 1):]] + [accepted]
        move_size = max(self.config.min_move_size,
                        adapt_move_size(state.move_size, sum(recent) / len(recent), 2 * self.config.move_size))
        fixed_kl = self.fixed_kl(best)
        record = {"generation": state.generation, "best_fitness": best_fitness, "fixed_kl": fixed_kl,
                  "paired_z": z_score, "challenger_fitness": scored[0][0],
                  "previous_fixed_kl": state.parent_fixed_kl,
                  "accepted": accepted, "acceptance_rate": sum(recent) / len(recent), "move_size": state.move_size,
                  "median_fitness": stages[-1]["median"], "stages": stages,
                  "kept": self.budget.cost(best), "evaluations": sum(s["candidates"] for s in stages),
                  "wall_s": time.perf_counter() - start, "compute_s": self.compute_s - compute_before}
        return SearchState(state.config_digest, state.database, state.generation + 1, list(best), best_fitness,
                           _encode_rng(rng.getstate()), state.history + [record], move_size=move_size,
                           parent_fixed_kl=fixed_kl, start=state.start)

    def save(self, state: SearchState) -> None:
        if self.state_uri is not None:
            uri_io.write_bytes(self.state_uri, state.to_json())

    def run(self, on_generation=None) -> SearchState:
        """Run (or resume) to `config.generations`; saves the state after each; returns the final state."""
        state = self.load_or_start()
        bar = tqdm(total=self.config.generations, initial=state.generation, desc="search", unit="gen",
                   disable=not self.progress)
        while state.generation < self.config.generations:
            state = self.generation(state)
            self.save(state)
            if on_generation is not None:
                on_generation(state)
            bar.update(1)
            bar.set_postfix(kl=f"{state.parent_fitness:.4f}", fixed_kl=f"{state.parent_fixed_kl:.4f}",
                            move=state.move_size)
        bar.close()
        return state

    def genome(self, state: SearchState) -> Genome:
        return Genome(tuple(state.parent), self.database_digest)


def rank(candidates, per_row_fitnesses) -> list[tuple[float, tuple[int, ...], list[float]]]:
    """(mean fitness, candidate, per-row fitness) best first; ties keep the candidates' order, so every
    evaluation path (serial or distributed) selects the same."""
    scored = [(statistics.fmean(rows), tuple(c), [float(r) for r in rows])
              for c, rows in zip(candidates, per_row_fitnesses)]
    return sorted(scored, key=lambda entry: entry[0])


def paired_z(challenger: list[float], parent: list[float]) -> float | None:
    """Mean per-row difference challenger − parent over its standard error (negative: the challenger is
    better); None on fewer than two rows, where no error can be measured. Rows differ more from each other
    than two neighbouring genomes do on one row, so only the paired difference resolves a decision."""
    differences = [c - p for c, p in zip(challenger, parent)]
    if len(differences) < 2:
        return None
    sd = statistics.stdev(differences)
    mean = statistics.fmean(differences)
    if sd == 0:
        return 0.0 if mean == 0 else float("-inf") if mean < 0 else float("inf")
    return mean / (sd / len(differences) ** 0.5)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") >> 1


def _encode_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(encoded) -> tuple:
    version, internal, gauss = encoded
    return (version, tuple(internal), gauss)
