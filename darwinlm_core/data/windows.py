"""Held-out windows: spread evenly over the whole held-out text, and split alternately into validation and test.

Why spread: the first contiguous tokens of a held-out text are one stretch of it (a few recent speeches, the
opening chapters of a novel), so a figure measured there describes that stretch, and its windows, neighbours in
one document, are far from independent samples. Windows evenly spaced from the text's first token to its last
sample all of it.

Why two splits: held-out figures that chose something (a preset, a knob, a refit weight) are biased towards
the choice, like a dev set. Validation windows make every choice; test windows are read only for reported
results. Alternating windows (1st, 3rd, ... validation; 2nd, 4th, ... test) puts both splits over the whole text.
The rule is deterministic (no seed): the same text, tokenizer and window count give the same windows anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from darwinlm.core.data.sources import Document
from darwinlm.core.data.tokens import token_stream
from darwinlm.core.errors import DarwinLMError

VALIDATION, TEST = "validation", "test"
EVAL_SPLITS = (VALIDATION, TEST)
# Names the rule below. It is part of the content address of the dense model's stored evaluation, so figures
# measured under another rule (the first contiguous windows, before this one) are never reused.
WINDOWS_PROTOCOL = "spread-alternating-v1"
WINDOWS_RULE = (
    "per evaluation set: 2 x eval_windows non-overlapping windows of seq_len tokens (fewer if the text holds fewer), "
    "evenly spaced over the whole EOS-joined token stream, the first at its first token and the last ending at its "
    "last; windows 1, 3, 5, ... are validation, windows 2, 4, 6, ... are test"
)


def check_eval_split(split: str) -> str:
    """`split` itself if it names an evaluation split; a one-line DarwinLMError otherwise."""
    if split not in EVAL_SPLITS:
        raise DarwinLMError(f"unknown evaluation split {split!r}",
                            "use 'validation' to choose (presets, knobs, weights) or 'test' for reported results")
    return split


def spread_starts(stream_tokens: int, seq_len: int, count: int) -> list[int]:
    """Start offsets of `count` windows of `seq_len` evenly spaced over a stream of `stream_tokens` tokens: the
    first at 0, the last ending at the stream's end. Non-overlapping whenever count · seq_len ≤ stream_tokens
    (the spacing is then at least seq_len)."""
    if count < 1 or count * seq_len > stream_tokens:
        raise DarwinLMError(f"{count} windows of {seq_len} tokens do not fit in {stream_tokens} tokens",
                            "give more held-out text, fewer windows or a smaller seq_len")
    if count == 1:
        return [0]
    room = stream_tokens - seq_len
    return [index * room // (count - 1) for index in range(count)]


@dataclass(frozen=True)
class HeldOutWindows:
    """One evaluation set's windows: `starts[split]` (token offsets in its stream) and `windows[split]`,
    int64 (n, seq_len), for split in EVAL_SPLITS; `stream_tokens`: tokens in the whole held-out text."""

    stream_tokens: int
    seq_len: int
    starts: dict[str, tuple[int, ...]]
    windows: dict[str, torch.Tensor]

    def of(self, split: str) -> torch.Tensor:
        """The windows of `split`, (n, seq_len) int64."""
        return self.windows[check_eval_split(split)]

    def describe(self, split: str) -> dict:
        """What an evaluation on `split` read: window count, the tokens its windows spread over (first window's
        start to last window's end) and the stream's length."""
        starts = self.starts[check_eval_split(split)]
        return {"count": len(starts), "spread_over_tokens": starts[-1] + self.seq_len - starts[0],
                "stream_tokens": self.stream_tokens}

    def record(self) -> dict:
        """JSON for manifests: every window's start, per split, so the split can be checked and rebuilt."""
        return {"stream_tokens": self.stream_tokens, "seq_len": self.seq_len,
                **{split: list(self.starts[split]) for split in EVAL_SPLITS}}


def windows_used(held_out: dict[str, HeldOutWindows], split: str) -> dict:
    """What an evaluation on `split` of these evaluation sets read, for its record: {"split", "protocol",
    "sets": {name: {"count", "spread_over_tokens", "stream_tokens"}}}."""
    return {"split": check_eval_split(split), "protocol": WINDOWS_PROTOCOL,
            "sets": {name: windows.describe(split) for name, windows in held_out.items()}}


def windows_record(held_out: dict[str, HeldOutWindows]) -> dict:
    """The validation/test split of these evaluation sets, for a manifest: protocol, rule, every window's start."""
    return {"protocol": WINDOWS_PROTOCOL, "rule": WINDOWS_RULE,
            "sets": {name: windows.record() for name, windows in held_out.items()}}


def windows_of_stream(stream: torch.Tensor, seq_len: int, per_split: int) -> HeldOutWindows:
    """Validation and test windows of a token stream (n_tokens,) int64: 2 · per_split windows spread over it
    (all that fit without overlap when fewer do), alternately validation and test. Needs room for two windows."""
    if seq_len < 1 or per_split < 1:
        raise DarwinLMError(f"seq_len {seq_len} and windows per split {per_split} must be positive",
                            "pass positive values")
    stream_tokens = int(stream.numel())
    count = min(2 * per_split, stream_tokens // seq_len)
    if count < 2:
        raise DarwinLMError(
            f"the held-out text gives {stream_tokens} tokens, but a validation and a test window of seq_len "
            f"{seq_len} need {2 * seq_len}", "give more held-out text or a smaller seq_len")
    starts = spread_starts(stream_tokens, seq_len, count)
    by_split = {VALIDATION: tuple(starts[0::2]), TEST: tuple(starts[1::2])}
    windows = {split: torch.stack([stream[start : start + seq_len] for start in split_starts])
               for split, split_starts in by_split.items()}
    return HeldOutWindows(stream_tokens, seq_len, by_split, windows)


def held_out_windows(documents: Sequence[Document], tokenizer, seq_len: int, per_split: int) -> HeldOutWindows:
    """Validation and test windows spread over the whole of `documents` (see windows_of_stream)."""
    return windows_of_stream(token_stream(documents, tokenizer), seq_len, per_split)
