"""The one layer-by-layer driver: run a causal LM block by block over calibration rows.

Calibration, database building and reconstruction checks all need "the inputs of block i". Rather than a
capture loop per architecture (the sparsegpt/EvoPress pattern), the driver asks the model itself:
  * the extra arguments each block receives (rotary cos/sin, causal or sliding-window mask, position ids) are
    recorded once by hooks during a single batch-1 forward pass, so per-family differences (Qwen2's per-layer
    mask types, say) come for free and broadcast over any batch size;
  * the hidden states entering block 0 are caught by a hook that stops the forward pass there, so embedding
    scaling or other pre-block work is whatever the model does.
Then blocks run in order, each replacing the activation buffer in place: one block's activations are alive.
"""

import torch
from torch import nn

from darwinlm.core.model.arch import ArchSpec, arch_for

# Block arguments that belong to incremental decoding, not to a full-sequence pass.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


class BlockDriver:
    """Walks a model's decoder blocks over token rows, one block at a time.

    After construction, `hidden` holds the inputs of block `position` (starting at 0); `advance()` runs that
    block over them in batches and overwrites `hidden` with its outputs. Hooks a caller registers on the
    block's submodules (to collect Hessians, say) fire during `advance()`.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                 block_kwargs: list[dict] | None = None):
        """input_ids: (n_rows, seq_len) int64, no padding. block_kwargs: the `block_kwargs` of a driver of the same
        model over rows of the same length, to skip recording them again (a batch-1 pass through every block)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (n_rows, seq_len), got shape {tuple(input_ids.shape)}")
        self.model = model
        self.spec: ArchSpec = arch_for(model)
        self.blocks = self.spec.block_list(model)
        self.batch_size = batch_size
        self.position = 0
        device = next(model.parameters()).device
        with torch.no_grad():
            self.block_kwargs = block_kwargs or record_block_kwargs(model, self.spec, input_ids.shape[1], device)
            self.hidden = _capture_block0_inputs(model, self.blocks, input_ids.to(device), batch_size)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def advance(self) -> None:
        """Run block `position` over `hidden` (in place, batch by batch) and move to the next block."""
        if self.position >= self.num_blocks:
            raise IndexError("the driver has already run every block")
        self.run_block(self.position, self.hidden, out=self.hidden)
        self.position += 1

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Block `index` over `hidden` (n_rows, seq_len, d), batch by batch, into `out` (default: a new tensor;
        `hidden` itself is fine, since each batch is read before it is written). Touches no driver state."""
        out = torch.empty_like(hidden) if out is None else out
        block, kwargs = self.blocks[index], self.block_kwargs[index]
        for start in range(0, hidden.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            output = block(hidden[rows], **kwargs)
            out[rows] = output[0] if isinstance(output, tuple) else output
        return out

    @torch.no_grad()
    def observe(self, stop_at: nn.Module | None = None) -> None:
        """Run block `position` over `hidden` for its hooks only: `hidden` and `position` stay as they are.

        With `stop_at` (a submodule of the block), each batch stops once that submodule's forward pre-hooks
        have run, so a caller who wants the inputs of o_proj does not pay for the MLP. Hooks the caller
        registered on `stop_at` before this call fire first.
        """
        if self.position >= self.num_blocks:
            raise IndexError("the driver has already run every block")
        block, kwargs = self.blocks[self.position], self.block_kwargs[self.position]
        handle = None if stop_at is None else stop_at.register_forward_pre_hook(_raise_stop)
        try:
            for start in range(0, self.hidden.shape[0], self.batch_size):
                try:
                    block(self.hidden[start : start + self.batch_size], **kwargs)
                except _StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()

    def run_to_end(self) -> torch.Tensor:
        """Run every remaining block; returns the last block's outputs, (n_rows, seq_len, hidden) float."""
        while self.position < self.num_blocks:
            self.advance()
        return self.hidden

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Final norm and LM head over the last block's outputs: (n_rows, seq_len, vocab). Runs remaining blocks."""
        hidden = self.run_to_end()
        return torch.cat([self.head_logits(hidden[s : s + self.batch_size])
                          for s in range(0, hidden.shape[0], self.batch_size)])

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over last-block outputs of one batch: (rows, seq_len, hidden) → (..., vocab)."""
        return self.model.get_submodule(self.spec.lm_head)(self.model.get_submodule(self.spec.final_norm)(hidden))


def _raise_stop(*_):
    raise _StopForward


def record_block_kwargs(model: nn.Module, spec: ArchSpec, seq_len: int, device) -> list[dict]:
    """Keyword arguments each block receives in a full-sequence, cache-free pass, recorded with batch 1.

    The pass stops at the final norm: the LM head's logits are not needed and cost a vocabulary-wide matmul.
    """
    blocks = spec.block_list(model)
    recorded: list[dict] = [{} for _ in blocks]

    def recorder(index):
        def hook(_module, _args, kwargs):
            recorded[index] = {k: v for k, v in kwargs.items() if k not in _CACHE_ARGUMENTS}

        return hook

    def stop(*_):
        raise _StopForward

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(model.get_submodule(spec.final_norm).register_forward_pre_hook(stop))
    try:
        model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _capture_block0_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Hidden states entering block 0 for every row: (n_rows, seq_len, hidden), in the model's dtype."""
    captured: list[torch.Tensor] = []

    def catch(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)
