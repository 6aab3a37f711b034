"""Latency-aware budgets (as ZipLM): per-module, per-level prefill latency measured once, where the model will run.

A module's latency at a level depends on its shape (units kept), not on which units are kept, so modules are
grouped by shape and each group is timed once per level. Two engines measure a table of the same form:

- `torch`: each distinct module shape is timed on the first layer that has it, set to each level in the live
  model (physically shrunk), its forward over one (batch, seq_len) prefill timed with the block arguments the
  model itself passes (driver.record_block_kwargs).
- `llama.cpp`: where users serve the model. One GGUF per (group, level) has every module of that group at the
  level and the other groups at the middle of their ladders; llama.cpp times each one's prefill of a seq_len
  prompt at the given thread count (logits for the last token only, as serving does), in interleaved rounds. A
  module's cost at a level is the whole model's time with its group there, less the time with the group removed,
  divided by the group's size. Rounds are saved as they finish, so an interrupted measurement resumes; the GGUFs
  are written once to a local scratch folder and removed at the end.

Either way the part of a forward outside the modules (embedding, norms, LM head) is `rest_s`, so a table
predicts a whole model's prefill speedup (predicted_speedup), and a module removed costs 0. Tables are stored
next to the database, one per engine, device (thread count, quant) and input shape.
"""

import json
import shutil
from pathlib import Path

import torch

from darwinlm.core import uri_io
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.timing import (interleaved_medians, llama_cpp_prefill_seconds, open_llama_cpp,
                                              timed_seconds)
from darwinlm.core.home import data_home
from darwinlm.core.model.driver import record_block_kwargs
from darwinlm.core.search.genome import module_keys

LATENCY_ENGINES = ("torch", "llama.cpp")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


def llama_cpp_device_name(threads: int, quant: str) -> str:
    return f"llama.cpp-{quant}-{threads}threads"


def table_uri(database_root: str, device: str, batch: int, seq_len: int) -> str:
    return uri_io.join(database_root, "latency", f"{device}-b{batch}-s{seq_len}.json")


def shape_groups(assembly: LiveAssembly) -> dict[tuple, list[tuple[int, str]]]:
    """Module keys grouped by what their latency depends on: kind, units, unit size and number of levels."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    database = assembly.database
    for layer, kind in module_keys(database):
        shape = assembly.shapes[layer][kind]
        signature = (kind, shape.n_units, shape.unit_size, database.num_levels(layer, kind))
        groups.setdefault(signature, []).append((layer, kind))
    return groups


def _non_increasing(seconds: list[float]) -> list[float]:
    """A more pruned module is not slower: measurement noise that says otherwise is clipped; removed costs 0."""
    seconds = list(seconds)
    for level in range(1, len(seconds)):
        seconds[level] = min(seconds[level], seconds[level - 1])
    seconds[-1] = 0.0
    return seconds


def _time(call, repeats: int, device: torch.device) -> float:
    """Median seconds of `call()` after one warm-up (first calls allocate and pick kernels)."""
    return interleaved_medians({"call": lambda: timed_seconds(call, device)}, repeats)["call"]


@torch.no_grad()
def measure_latency_table(assembly: LiveAssembly, batch: int = 1, seq_len: int = 512, repeats: int = 5,
                          progress: bool = False) -> dict:
    """The torch table: {"modules": [{"layer", "kind", "seconds": [per level]}], "rest_s", "dense_forward_s",
    "engine", "device", "batch", "seq_len"}; seconds never rise with the level."""
    model = assembly.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kwargs = record_block_kwargs(model, assembly.spec, seq_len, device)
    saved = dict(assembly.levels)
    hidden = torch.randn(batch, seq_len, model.config.hidden_size, device=device, dtype=dtype)
    seconds_of = {}
    for (kind, n_units, _, levels), keys in shape_groups(assembly).items():
        layer = keys[0][0]
        seconds = []
        for level in range(levels):
            assembly.apply({(layer, kind): level})
            module = assembly.modules[(layer, kind)]
            call = (lambda m=module: m(hidden_states=hidden, **kwargs[layer])) if kind == "attn" else (
                lambda m=module: m(hidden))
            seconds.append(_time(call, repeats, device))
        seconds = _non_increasing(seconds)
        seconds_of.update({key: seconds for key in keys})
        if progress:
            print(f"latency {kind} ({n_units} units): " + " ".join(f"{s * 1e3:.2f}" for s in seconds) + " ms",
                  flush=True)
    assembly.apply(saved)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    assembly.apply({key: 0 for key in assembly.levels})
    whole = _time(lambda: model(ids, use_cache=False), repeats, device)
    assembly.apply(saved)
    modules = [{"layer": layer, "kind": kind, "seconds": seconds_of[(layer, kind)]}
               for layer, kind in module_keys(assembly.database)]
    dense_modules = sum(m["seconds"][0] for m in modules)
    return {"engine": "torch", "device": device_name(device), "batch": batch, "seq_len": seq_len,
            "modules": modules, "rest_s": max(0.0, whole - dense_modules), "dense_forward_s": whole}


def _reference_level(levels: int) -> int:
    return (levels - 1) // 2


def _llama_cpp_variants(assembly: LiveAssembly) -> dict[str, dict[tuple[int, str], int]]:
    """The models llama.cpp times: dense; the reference, every group at the middle of its ladder; and per group and
    other level, the reference with that group's modules at the level. Pruned modules save a little less together
    than apart (SmolLM2 at 2 threads: 4-6%, experiments/2026-12-05-llama-cpp-latency-table), so each group's costs
    are taken where searched genomes live, not beside a dense model."""
    groups = shape_groups(assembly)
    reference = {key: _reference_level(levels) for (_, _, _, levels), keys in groups.items() for key in keys}
    variants = {"dense": {key: 0 for key in reference}, "reference": reference}
    for index, ((kind, _, _, levels), keys) in enumerate(groups.items()):
        for level in range(levels):
            if level != _reference_level(levels):
                variants[f"group{index}-{kind}-level{level}"] = {**reference, **{key: level for key in keys}}
    return variants


@torch.no_grad()
def _write_variant_ggufs(assembly: LiveAssembly, tokenizer, variants: dict, scratch: Path, quant: str,
                         progress: bool) -> dict[str, Path]:
    """One GGUF per variant in `scratch`, each written whole or not at all (export_gguf), kept across a resume."""
    # imported here: the GGUF writer brings the pruned model classes (transformers), which the CLI must not load
    # before it has set the offline defaults, and the search imports this module
    from darwinlm.core.export.gguf import export_gguf

    saved = dict(assembly.levels)
    files = {}
    try:
        for number, (name, levels) in enumerate(variants.items(), 1):
            files[name] = scratch / f"{name}.gguf"
            if files[name].exists():
                continue
            assembly.apply(levels)
            export_gguf(assembly.model, tokenizer, str(files[name]), quant=quant)
            if progress:
                print(f"latency llama.cpp: wrote {name} ({number}/{len(variants)})", flush=True)
    finally:
        assembly.apply(saved)
    return files


def gguf_prefill_seconds(path: Path, prompt: list[int], threads: int) -> float:
    """One timed prefill of a GGUF just loaded and warmed on a short prompt (its weights paged in)."""
    llm = open_llama_cpp(path, threads, n_ctx=len(prompt) + 8)
    try:
        llm.eval(prompt[:64])
        return llama_cpp_prefill_seconds(llm, prompt)
    finally:
        llm.close()


def measure_llama_cpp_table(assembly: LiveAssembly, tokenizer, seq_len: int = 512, threads: int = 2,
                            repeats: int = 7, quant: str = "f16", partial_uri: str | None = None,
                            scratch: Path | None = None, progress: bool = False) -> dict:
    """The llama.cpp table (same form as measure_latency_table's, batch 1). Each of `repeats` rounds times every
    variant once, in rotated order, and is saved at `partial_uri` when it ends; a measurement started again with
    the same partial file resumes after its last whole round. `scratch` (default: under the data home) holds
    the variants' GGUFs meanwhile: one model file per variant."""
    variants = _llama_cpp_variants(assembly)
    scratch = scratch or data_home() / "latency-scratch" / f"{assembly.database.digest}-{quant}"
    scratch.mkdir(parents=True, exist_ok=True)
    files = _write_variant_ggufs(assembly, tokenizer, variants, scratch, quant, progress)
    samples = {name: [] for name in variants}
    if partial_uri and uri_io.exists(partial_uri):
        saved = json.loads(uri_io.read_bytes(partial_uri))
        if set(saved) == set(samples):  # else it was measured on other variants: start over
            samples = saved
    vocab = int(assembly.model.config.vocab_size)
    prompt = [(17 + 7919 * i) % vocab for i in range(seq_len)]  # which tokens does not change the cost

    def save_round(round_index: int, latest: dict) -> None:
        for name, seconds in latest.items():
            samples[name] = samples[name][:round_index] + [seconds]
        if partial_uri:
            uri_io.write_bytes(partial_uri, json.dumps(samples).encode())
        if progress:
            print(f"latency llama.cpp: round {round_index + 1}/{repeats}, dense prefill {latest['dense'] * 1e3:.0f} ms",
                  flush=True)

    medians = interleaved_medians({name: (lambda path=files[name]: gguf_prefill_seconds(path, prompt, threads))
                                   for name in variants}, repeats, warmup=False, on_repeat=save_round, earlier=samples)
    table = _table_from_variants(assembly, medians)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"engine": "llama.cpp", "device": llama_cpp_device_name(threads, quant), "batch": 1, "seq_len": seq_len,
            "threads": threads, "quant": quant, "repeats": repeats, **table}


def _table_from_variants(assembly: LiveAssembly, medians: dict[str, float]) -> dict:
    """Per-module seconds from whole-model prefill times: a group of n modules at level l costs
    (time at l − time with the group removed) / n per module, the other groups at their reference levels; the rest
    is what the reference model spends outside the modules."""
    seconds_of = {}
    for index, ((kind, _, _, levels), keys) in enumerate(shape_groups(assembly).items()):
        whole = [medians["reference"] if level == _reference_level(levels) else
                 medians[f"group{index}-{kind}-level{level}"] for level in range(levels)]
        seconds = _non_increasing([max(0.0, (time - whole[-1]) / len(keys)) for time in whole])
        seconds_of.update({key: seconds for key in keys})
    modules = [{"layer": layer, "kind": kind, "seconds": seconds_of[(layer, kind)]}
               for layer, kind in module_keys(assembly.database)]
    in_modules = sum(m["seconds"][_reference_level(len(m["seconds"]))] for m in modules)
    return {"modules": modules, "rest_s": max(0.0, medians["reference"] - in_modules),
            "dense_forward_s": medians["dense"], "variant_seconds": medians}


def load_or_measure(assembly: LiveAssembly, batch: int = 1, seq_len: int = 512, progress: bool = False, *,
                    engine: str = "torch", tokenizer=None, threads: int = 0) -> dict:
    """The stored table for this database, engine, device and input shape, measured (and stored) on first use.
    llama.cpp tables need the model's `tokenizer` (a GGUF carries its vocabulary) and time a single prompt at
    `threads` (0: torch's thread count)."""
    if engine not in LATENCY_ENGINES:
        raise DarwinLMError(f"unknown latency engine '{engine}'", f"use one of {', '.join(LATENCY_ENGINES)}")
    root = assembly.database.root
    if engine == "torch":
        uri = table_uri(root, device_name(next(assembly.model.parameters()).device), batch, seq_len)
        if uri_io.exists(uri):
            return json.loads(uri_io.read_bytes(uri))
        table = measure_latency_table(assembly, batch, seq_len, progress=progress)
    else:
        if tokenizer is None:
            raise DarwinLMError("a llama.cpp latency table needs the model's tokenizer (GGUFs carry the vocabulary)",
                                "pass tokenizer= to the search")
        threads = threads or torch.get_num_threads()
        uri = table_uri(root, llama_cpp_device_name(threads, "f16"), 1, seq_len)
        if uri_io.exists(uri):
            return json.loads(uri_io.read_bytes(uri))
        table = measure_llama_cpp_table(assembly, tokenizer, seq_len, threads, partial_uri=uri + ".partial",
                                        progress=progress)
    uri_io.write_bytes(uri, json.dumps(table, indent=1).encode())
    if engine != "torch":
        uri_io.remove(uri + ".partial")
    return table


def predicted_speedup(table: dict, levels: dict[tuple[int, str], int]) -> float:
    """The measured dense forward time ÷ the table's time at `levels` ({(layer, kind): level}). The dense time is
    the measured one, not the table's sum: pruned modules save a little less together than apart, so a llama.cpp
    table taken mid-ladder sums dense 9% high on SmolLM2 (experiments/2026-12-05-llama-cpp-latency-table); in a
    torch table the two are equal by construction."""
    seconds = {(m["layer"], m["kind"]): m["seconds"] for m in table["modules"]}
    return table["dense_forward_s"] / (table["rest_s"] + sum(seconds[key][level] for key, level in levels.items()))
