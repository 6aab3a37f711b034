"""One-shot KL of candidates that keeps the blocks a candidate shares with the one measured before it.

Offspring differ from their parent in a few modules, and the informed start's slopes move one module at a time.
On the same rows, every block below the first module that differs runs the same weights on the same inputs as
it did for the previous candidate, so its outputs are kept instead of computed again. The remaining blocks run
in the batches a full forward pass uses, so the KL is bit for bit `kl_per_row`'s: checked once per evaluator
against a full pass, and where it differs (a model whose forward does more than blocks, norm and head) every
evaluation is a full pass.
"""

import torch

from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.search.fitness import CompactTeacher, kl_per_row


class PrefixReuse:
    """KL per row of a live model whose modules are set by level tuples (module i sits in block
    `module_blocks[i]`); remembers every block's inputs for the last levels and rows it measured."""

    def __init__(self, model, module_blocks: list[int], batch_size: int, max_bytes: int = 1 << 30):
        self.model, self.module_blocks, self.batch_size = model, list(module_blocks), batch_size
        self.max_bytes = max_bytes  # the kept block inputs of one row set; rows that need more get full passes
        self.verified: bool | None = None  # None until the first measurement compares with a full pass
        self.reused_blocks = self.run_blocks = 0  # over the evaluator's life: how much the reuse saved
        self._block_kwargs: dict[int, list[dict]] = {}  # by row length: recorded once, shared by every driver
        self.forget()

    def forget(self) -> None:
        """Drop the kept block inputs: the live weights changed other than through levels (a finetune)."""
        self._driver: BlockDriver | None = None
        self._rows: torch.Tensor | None = None
        self._levels: tuple[int, ...] | None = None
        self._inputs: list[torch.Tensor] = []  # _inputs[b]: input of block b (the last: the last block's output)

    def kl_per_row(self, levels: tuple[int, ...], teacher: CompactTeacher) -> list[float]:
        """KL per row of the live model, which must already be set to `levels`."""
        if self.verified is False or not self._fits(teacher.input_ids):
            return kl_per_row(self.model, teacher, self.batch_size)
        reused = self._reusing(levels, teacher)
        if self.verified is None:
            self.verified = reused == kl_per_row(self.model, teacher, self.batch_size)
            if not self.verified:
                self.forget()
                return kl_per_row(self.model, teacher, self.batch_size)
        return reused

    def evaluation_order(self, candidates: list[tuple[int, ...]]) -> list[int]:
        """Indices of `candidates` in the order that keeps the most blocks: sorted by levels, block-major, each
        candidate shares the longest prefix possible with the one before it."""
        return sorted(range(len(candidates)), key=lambda index: tuple(candidates[index]))

    def _fits(self, input_ids: torch.Tensor) -> bool:
        blocks = len(set(self.module_blocks))
        width = self.model.config.hidden_size * next(self.model.parameters()).element_size()
        return (blocks + 1) * input_ids.numel() * width <= self.max_bytes

    def _reusing(self, levels: tuple[int, ...], teacher: CompactTeacher) -> list[float]:
        levels = tuple(levels)
        ids = teacher.input_ids
        if self._rows is None or not torch.equal(self._rows, ids):
            seq_len = ids.shape[1]
            self._driver = BlockDriver(self.model, ids, self.batch_size, block_kwargs=self._block_kwargs.get(seq_len))
            self._block_kwargs[seq_len] = self._driver.block_kwargs
            self._rows, self._inputs, first = ids.clone(), [self._driver.hidden], 0
        else:
            changed = (block for block, now, before in zip(self.module_blocks, levels, self._levels) if now != before)
            first = min(changed, default=self._driver.num_blocks)
            first = min(first, len(self._inputs) - 1)
        del self._inputs[first + 1 :]
        self.reused_blocks += first
        for block in range(first, self._driver.num_blocks):
            self._inputs.append(self._driver.run_block(block, self._inputs[block]))
            self.run_blocks += 1
        self._levels = levels
        last = self._inputs[-1]
        return kl_per_row(self.model, teacher, self.batch_size,
                          logits_of=lambda rows: self._driver.head_logits(last[rows]))
