"""Latency-aware budgets (as ZipLM): per-module, per-level forward latency measured once on the target device.

A module's latency at a level depends on its shape (units kept), not on which units are kept, so each
distinct module shape is timed once, on the first layer that has it, at every level of its ladder: the
module is set to the level in the live model (physically shrunk) and its forward over one (batch, seq_len)
prefill is timed with the block arguments the model itself passes (driver.record_block_kwargs). The part of
a forward outside the blocks (embedding, final norm, LM head) is timed too, so a table predicts a whole
model's prefill speedup. Tables are stored next to the database, one per device and shape of input.
"""

import json

import torch

from darwinlm.core import uri_io
from darwinlm.core.evaluation.timing import interleaved_medians, timed_seconds
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.model.driver import record_block_kwargs
from darwinlm.core.search.genome import module_keys


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}threads"


def table_uri(database_root: str, device: str, batch: int, seq_len: int) -> str:
    return uri_io.join(database_root, "latency", f"{device}-b{batch}-s{seq_len}.json")


def _time(call, repeats: int, device: torch.device) -> float:
    """Median seconds of `call()` after one warm-up (first calls allocate and pick kernels)."""
    return interleaved_medians({"call": lambda: timed_seconds(call, device)}, repeats)["call"]


@torch.no_grad()
def measure_latency_table(assembly: LiveAssembly, batch: int = 1, seq_len: int = 512, repeats: int = 5,
                          progress: bool = False) -> dict:
    """{"modules": [{"layer", "kind", "seconds": [per level]}], "rest_s", "device", "batch", "seq_len"};
    seconds never rise with the level (a more pruned module is not slower: measurement noise is clipped)."""
    model, database = assembly.model, assembly.database
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kwargs = record_block_kwargs(model, assembly.spec, seq_len, device)
    saved = dict(assembly.levels)
    hidden = torch.randn(batch, seq_len, model.config.hidden_size, device=device, dtype=dtype)
    by_shape: dict[tuple, list[float]] = {}
    modules = []
    keys = module_keys(database)
    for layer, kind in keys:
        shape = assembly.shapes[layer][kind]
        signature = (kind, shape.n_units, shape.unit_size, database.num_levels(layer, kind))
        if signature not in by_shape:
            seconds = []
            for level in range(database.num_levels(layer, kind)):
                assembly.apply({(layer, kind): level})
                block = assembly.blocks[layer]
                module = getattr(block, assembly.spec.attention if kind == "attn" else assembly.spec.mlp)
                call = (lambda m=module: m(hidden_states=hidden, **kwargs[layer])) if kind == "attn" else (
                    lambda m=module: m(hidden))
                seconds.append(_time(call, repeats, device))
            for level in range(1, len(seconds)):
                seconds[level] = min(seconds[level], seconds[level - 1])
            seconds[-1] = 0.0  # the module is gone: its no-op costs nothing worth counting
            by_shape[signature] = seconds
            if progress:
                print(f"latency {kind} ({shape.n_units} units): " + " ".join(f"{s * 1e3:.2f}" for s in seconds)
                      + " ms", flush=True)
        modules.append({"layer": layer, "kind": kind, "seconds": by_shape[signature]})
    assembly.apply(saved)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    assembly.apply({key: 0 for key in assembly.levels})
    whole = _time(lambda: model(ids, use_cache=False), repeats, device)
    assembly.apply(saved)
    dense_modules = sum(m["seconds"][0] for m in modules)
    return {"device": device_name(device), "batch": batch, "seq_len": seq_len, "modules": modules,
            "rest_s": max(0.0, whole - dense_modules), "dense_forward_s": whole}


def load_or_measure(assembly: LiveAssembly, batch: int = 1, seq_len: int = 512, progress: bool = False) -> dict:
    """The stored table for this database, device and input shape, measured (and stored) on first use."""
    device = next(assembly.model.parameters()).device
    uri = table_uri(assembly.database.root, device_name(device), batch, seq_len)
    if uri_io.exists(uri):
        return json.loads(uri_io.read_bytes(uri))
    table = measure_latency_table(assembly, batch, seq_len, progress=progress)
    uri_io.write_bytes(uri, json.dumps(table, indent=1).encode())
    return table


def predicted_speedup(table: dict, levels: dict[tuple[int, str], int]) -> float:
    """Dense forward time ÷ the table's forward time at `levels` ({(layer, kind): level})."""
    seconds = {(m["layer"], m["kind"]): m["seconds"] for m in table["modules"]}
    dense = table["rest_s"] + sum(s[0] for s in seconds.values())
    pruned = table["rest_s"] + sum(seconds[key][level] for key, level in levels.items())
    return dense / pruned
