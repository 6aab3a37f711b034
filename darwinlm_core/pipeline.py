"""The compression stages as plain functions over a loaded model: what the Prefect tasks call.

prepare_data → build_database (database.py) → teacher → search (search.py) → post_train → evaluate → export.
Rows for each purpose are disjoint by construction: database calibration and fitness rows are different
blocks of the calibration split, finetuning uses the training split, evaluation the held-out split. Held-out
windows are split again (darwinlm.core.data.windows): `validation` for anything that chooses, `test` for what
is reported; `evaluate` reads the split it is told, `test` unless it chooses.
"""

import hashlib
from dataclasses import dataclass

import torch

from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.config import CompressConfig
from darwinlm.core.data.default_corpus import load_split
from darwinlm.core.data.splits import CorpusSplit
from darwinlm.core.data.tokens import tokenize_blocks
from darwinlm.core.data.windows import (TEST, HeldOutWindows, check_eval_split, held_out_windows, windows_record,
                                        windows_used)
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.metrics import perplexity_with_se
from darwinlm.core.search.finetune import finetune
from darwinlm.core.search.fitness import CompactTeacher, compute_teacher, kl_per_position, teacher_top_k
from darwinlm.core.search.genome import Genome


@dataclass(frozen=True)
class PreparedData:
    split: CorpusSplit
    calibration_ids: torch.Tensor  # (calibration_rows, seq_len): the database's Hessians
    teacher_pool_ids: torch.Tensor  # (teacher_pool_rows, seq_len): the search's teacher pool
    train_ids: torch.Tensor  # (train_rows, seq_len): finetunes inside selection
    post_train_ids: torch.Tensor  # (post_train_rows, seq_len): post-training, after the above in the stream
    held_out: dict[str, HeldOutWindows]  # evaluation set name → its validation and test windows

    @property
    def calibration_digest(self) -> str:
        return hashlib.sha256(self.split.digest.encode() + self.calibration_ids.numpy().tobytes()).hexdigest()

    def eval_windows(self, split: str) -> dict[str, torch.Tensor]:
        """Evaluation set name → its `split` windows ('validation' or 'test'), (≤ eval_windows, seq_len)."""
        check_eval_split(split)
        return {name: windows.of(split) for name, windows in self.held_out.items()}

    def windows_used(self, split: str) -> dict:
        """What an evaluation on `split` read, for its record: {"split", "protocol", "sets": {name: {"count",
        "spread_over_tokens", "stream_tokens"}}}."""
        return windows_used(self.held_out, split)

    def windows_record(self) -> dict:
        """The validation/test split of every evaluation set, for the run's data manifest."""
        return windows_record(self.held_out)


def _shuffled(blocks: torch.Tensor, seed: int) -> torch.Tensor:
    return blocks[torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))]


def prepare_data(config: CompressConfig, tokenizer) -> PreparedData:
    """Tokenize the split into the row sets every stage needs; too little text is a clear error."""
    data, split = config.data, load_split(config.data.text, config.data.text_field)
    calibration = _shuffled(tokenize_blocks(split.calibration, tokenizer, data.seq_len), data.seed)
    needed = data.calibration_rows + data.teacher_pool_rows
    if calibration.shape[0] < needed:
        raise DarwinLMError(f"the calibration text gives {calibration.shape[0]} rows of {data.seq_len} tokens, "
                            f"{needed} are needed (calibration_rows + teacher_pool_rows)",
                            "give more text or lower data.calibration_rows / data.teacher_pool_rows")
    training = _shuffled(tokenize_blocks(split.training, tokenizer, data.seq_len), data.seed + 1)
    if training.shape[0] < data.train_rows + data.post_train_rows:
        raise DarwinLMError(f"the training text gives {training.shape[0]} rows of {data.seq_len} tokens, "
                            f"{data.train_rows + data.post_train_rows} are needed",
                            "give more text or lower data.train_rows / data.post_train_rows")
    return PreparedData(
        split=split,
        calibration_ids=calibration[: data.calibration_rows],
        teacher_pool_ids=calibration[data.calibration_rows : needed],
        train_ids=training[: data.train_rows],
        post_train_ids=training[data.train_rows : data.train_rows + data.post_train_rows],
        held_out={name: held_out_windows(docs, tokenizer, data.seq_len, data.eval_windows)
                  for name, docs in split.evaluation.items()},
    )


def preflight(config: CompressConfig) -> None:
    """What a compression can check in seconds, before weights load or a workflow starts: the model's
    architecture is supported, its tokenizer fits it, and the text gives enough rows for every stage."""
    from darwinlm.core.model.loading import load_tokenizer

    prepare_data(config, load_tokenizer(config.model))


def post_train(assembly: LiveAssembly, genome: Genome, rows: torch.Tensor, config: CompressConfig,
               teacher: CompactTeacher | None = None, progress: bool = False) -> list[float]:
    """Assemble the winner afresh and finetune it on `rows` with warmup + cosine (and distillation)."""
    assembly.apply(genome.assignment(), rebuild=True)
    if rows.shape[0] == 0:
        return []
    return finetune(assembly.model, rows, config.post_train.finetune, teacher=teacher, progress=progress)


def evaluate(model, data: PreparedData, eval_teacher: CompactTeacher | None, batch_size: int = 4,
             progress: bool = False, split: str = TEST) -> dict:
    """Held-out perplexity per evaluation set (`ppl_<set>`) with its standard error over windows
    (`ppl_<set>_se`), and KL to the dense model on the in-domain windows (from the same forward pass as their
    perplexity), all on the `split` windows: 'test' for reported results, 'validation' for anything that
    chooses. `windows` records what was read (PreparedData.windows_used)."""
    windows = data.eval_windows(split)
    kl_rows: list[float] = []
    if eval_teacher is not None and not torch.equal(eval_teacher.input_ids, next(iter(windows.values()))):
        raise ValueError(f"eval_teacher is not of the first evaluation set's {split} windows (see dense_eval_teacher)")

    def kl_of(rows: slice, logits: torch.Tensor) -> None:
        teacher = eval_teacher.rows(torch.arange(rows.start, rows.stop))
        kl = kl_per_position(logits, teacher.top_logprobs.to(logits.device), teacher.top_ids.to(logits.device))
        kl_rows.extend(kl.mean(-1).tolist())

    results = _perplexities(model, windows, batch_size, progress, kl_of if eval_teacher is not None else None)
    if eval_teacher is not None:
        results["kl"] = sum(kl_rows) / len(kl_rows)
    results["windows"] = data.windows_used(split)
    return results


def evaluate_dense(model, data: PreparedData, top_k: int, batch_size: int = 4, progress: bool = False,
                   split: str = TEST) -> tuple[dict, CompactTeacher]:
    """`evaluate` of the dense model with the teacher it is scored against, made from the same forward pass as
    the in-domain perplexity: the teacher `dense_eval_teacher` gives, without a pass of its own. Its KL, to its
    own compact form, is 0, and is measured like any other."""
    windows = data.eval_windows(split)
    top_logprobs, top_ids, kl_rows = [], [], []

    def keep_teacher(_rows: slice, logits: torch.Tensor) -> None:
        values, ids = teacher_top_k(logits, top_k)
        top_logprobs.append(values)
        top_ids.append(ids)
        kl_rows.extend(kl_per_position(logits, values.to(logits.device), ids.to(logits.device)).mean(-1).tolist())

    results = _perplexities(model, windows, batch_size, progress, keep_teacher)
    results["kl"] = sum(kl_rows) / len(kl_rows)
    results["windows"] = data.windows_used(split)
    return results, CompactTeacher(next(iter(windows.values())), torch.cat(top_logprobs), torch.cat(top_ids))


def _perplexities(model, windows_by_set: dict[str, torch.Tensor], batch_size: int, progress: bool,
                  on_first_logits) -> dict[str, float]:
    """ppl_<set> and ppl_<set>_se of every evaluation set; `on_first_logits` sees the first set's logits."""
    results = {}
    for index, (name, windows) in enumerate(windows_by_set.items()):
        results[f"ppl_{name}"], results[f"ppl_{name}_se"] = perplexity_with_se(
            model, windows, batch_size=batch_size, progress=progress, desc=f"ppl {name}",
            on_logits=on_first_logits if index == 0 else None)
    return results


def dense_eval_teacher(model, data: PreparedData, top_k: int, split: str = TEST) -> CompactTeacher:
    """The dense model's compact log-probs on the first evaluation set's `split` windows, for the KL column of
    evaluations on that split."""
    return compute_teacher(model, next(iter(data.eval_windows(split).values())), top_k)
