"""The row sets every stage of a compression reads, tokenized from one corpus split.

Rows for each purpose are disjoint by construction: the database's calibration rows and the search's teacher
pool are different blocks of the calibration split, finetuning uses the training split, evaluation the held-out
split, whose windows are split again (darwinlm.core.data.windows): `validation` for anything that chooses,
`test` for what is reported.
"""

import hashlib
from dataclasses import dataclass

import torch

from darwinlm.core.data.default_corpus import load_split
from darwinlm.core.data.splits import CorpusSplit
from darwinlm.core.data.tokens import tokenize_blocks
from darwinlm.core.data.windows import (HeldOutWindows, check_eval_split, held_out_windows, windows_record,
                                        windows_used)
from darwinlm.core.errors import DarwinLMError


@dataclass(frozen=True)
class DataConfig:
    text: str | None = None  # None: the default State of the Union + Moby-Dick split
    text_field: str = "text"
    seq_len: int = 512
    calibration_rows: int = 64  # for the database's Hessians
    teacher_pool_rows: int = 16  # teacher pool the search samples its fitness rows from (disjoint from the above)
    train_rows: int = 64  # training-split pool for finetunes inside selection
    post_train_rows: int = 32
    # Held-out windows per evaluation set and split: this many test windows (read for reported results) and as
    # many validation windows (read to choose), alternating, spread over the whole held-out text (data.windows).
    eval_windows: int = 40
    # Shuffles the calibration and training rows. Apart from the search seed on purpose: a new search seed
    # reuses the database (same calibration rows, same content address) and changes only the search.
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 8 or min(self.calibration_rows, self.teacher_pool_rows, self.eval_windows) < 1:
            raise DarwinLMError("data: seq_len must be ≥ 8 and calibration_rows, teacher_pool_rows, eval_windows ≥ 1")


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


def prepare_data(data: DataConfig, tokenizer) -> PreparedData:
    """Tokenize the split into the row sets every stage needs; too little text is a clear error."""
    split = load_split(data.text, data.text_field)
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
