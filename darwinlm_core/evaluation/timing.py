"""Speed measured as a comparison: repetitions interleaved across the things compared, medians taken.

On a shared machine load comes and goes; interleaving (in rotated order) lets it hit every contender alike,
and the median ignores the odd stall. Speed is then best reported as a ratio of these medians.
"""

import statistics
import time
from typing import Callable, Mapping

import torch

from darwinlm.core.errors import DarwinLMError


def timed_seconds(call: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of one `call()`; on a GPU, after its queued kernels have finished."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(measures: Mapping[str, Callable[[], float | dict]], repeats: int, *,
                        prepare: Mapping[str, Callable[[], object]] | None = None,
                        warmup: bool = True, on_repeat: Callable[[int, dict], None] | None = None,
                        earlier: Mapping[str, list] | None = None) -> dict:
    """The median of what each measure returns, by name, over `repeats` rounds in rotated order.

    A measure returns a number (seconds, tokens/s) or a dict of numbers (then the medians are per key).
    `prepare[name]`, if given, runs untimed before each call of that measure (swapping weights in, say).
    `warmup` calls every measure once first and drops the result: first calls allocate and pick kernels.
    `on_repeat(round, latest)` sees each round's values, for progress lines (or to save them).
    `earlier`: each measure's values from rounds measured before (a measurement resumed); the rounds go on from
    there, in the same rotation."""
    names, prepare = list(measures), prepare or {}
    if warmup:
        for name in names:
            prepare.get(name, lambda: None)()
            measures[name]()
    samples: dict[str, list] = {name: list((earlier or {}).get(name, [])) for name in names}
    for round_index in range(min(len(values) for values in samples.values()), repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            prepare.get(name, lambda: None)()
            samples[name] = samples[name][:round_index] + [measures[name]()]
        if on_repeat is not None:
            on_repeat(round_index, {name: values[-1] for name, values in samples.items()})
    return {name: _median(values) for name, values in samples.items()}


def _median(values: list):
    if isinstance(values[0], dict):
        return {key: statistics.median(value[key] for value in values) for key in values[0]}
    return statistics.median(values)


def open_llama_cpp(path, threads: int, n_ctx: int, logits_all: bool = False):
    """A llama.cpp model (llama-cpp-python) on `threads` CPU threads, prompts read in batches of 512 tokens as
    llama.cpp serves them by default."""
    try:
        import llama_cpp
    except ImportError as error:
        raise DarwinLMError("timing in llama.cpp needs llama-cpp-python, which is not installed",
                            "pip install -r requirements/llama.txt") from error
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def llama_cpp_prefill_seconds(llm, prompt: list[int]) -> float:
    """Wall seconds a loaded llama.cpp model (open_llama_cpp) takes to read `prompt` from an empty cache, with
    logits for its last token only, as serving does."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - start
