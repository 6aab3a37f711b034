"""GGUF benchmark: SmolLM2 dense vs what the pipeline ships at 50% vs uniform 50%, at f16, q8_0 and q4_k_m, in llama.cpp.

    python -m bench.gguf [--windows 8] [--reps 5] [--threads 2] [--decode-tokens 64] [--rows 64]

Dense, every speedup's denominator, is SmolLM2 as a llama.cpp user has it: converted by llama.cpp's own
convert_hf_to_gguf.py from the vendored llama.cpp of the pinned llama-cpp-python sdist (llama_cpp_converter), and
quantized to q4_k_m by llama.cpp. The same dense weights through darwinlm's writer (the `dense_darwinlm_writer_*`
ratios) show what darwinlm's `deci` GGUF costs by itself. The pruned model is what the pipeline ships: the demo's
export that bench/results/demo.json names (`make demo`), else a `darwinlm compress` run's under data_home()/runs.
The uniform model is uniform 50% of the database bench.export builds (content-addressed, so it is reused), the same
size by parameters: the shipped model's speed against it says what the search's shapes cost in llama.cpp. Without
a shipped model, the pruned one is the uniform one. darwinlm's models are exported with `export_gguf`. Perplexity
is measured by llama.cpp on the same held-out 512-token windows torch is scored on (ppl_rel_diff_f16 compares the
two), and speeds are medians of interleaved repetitions within this run: every repetition times every (model,
quant) once, in rotated order, so load on a shared machine hits all alike. Prefill is one 512-token prompt with
logits for its last token only (as serving does); decode feeds held-out tokens one at a time after it. Writes
bench/results/gguf.json.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.results_file import provenance, write_results
from darwinlm.core.evaluation.timing import interleaved_medians, llama_cpp_prefill_seconds, open_llama_cpp
from darwinlm.flows.offline import apply_offline_defaults

QUANTS = ("f16", "q8_0", "q4_k_m")
DENSE_OURS = "dense_darwinlm_writer"
# What llama.cpp's converter needs from the llama-cpp-python sdist: the script, its `conversion` package and gguf-py.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# convert_hf_to_gguf imports sentencepiece before it looks for a tokenizer.model, which SmolLM2 (a BPE tokenizer)
# does not have; this stands in for the package so the converter falls through to its BPE path, as it would with
# sentencepiece installed. A model with a tokenizer.model gets this error instead of a silent wrong vocabulary.
SENTENCEPIECE_STAND_IN = """class SentencePieceProcessor:
    def __init__(self, *args, **kwargs):
        raise ImportError("bench.gguf: this model has a tokenizer.model; install sentencepiece to convert it")
"""
# issue 38: what ships runs ≥ 1.5x dense prefill and ≥ 1.4x dense decode, at f16 and at q8_0
GOALS = {"prefill_speedup_f16": "≥ 1.5", "decode_speedup_f16": "≥ 1.4", "prefill_speedup_q8_0": "≥ 1.5",
         "decode_speedup_q8_0": "≥ 1.4", "ppl_rel_diff_f16": "≤ 0.01"}


def _shipped_model():
    """(the pipeline's exported model, where it came from, kept block fraction), or None when no run exported one:
    the demo's export named by bench/results/demo.json, else the first `darwinlm compress` run under the data home."""
    import json

    from transformers import AutoModelForCausalLM

    from bench.results_file import RESULTS_DIR
    from darwinlm.core.home import data_home

    demo = RESULTS_DIR / "demo.json"
    folders = [Path(json.loads(demo.read_text())["model_uri"])] if demo.is_file() else []
    folders += sorted((data_home() / "runs").glob("*-smollm2/model"))
    for folder in folders:
        if (folder / "config.json").is_file() and (folder / "darwinlm.json").is_file():
            info = json.loads((folder / "darwinlm.json").read_text())
            fraction = info["kept_block_params"] / info["dense_block_params"]
            return AutoModelForCausalLM.from_pretrained(folder).eval(), f"shipped: {folder}", fraction
    return None


def llama_cpp_converter() -> Path:
    """llama.cpp's own convert_hf_to_gguf.py, from the vendored llama.cpp of the sdist of the installed
    llama-cpp-python (the pinned version), kept under data_home()/llama-cpp-converter/<version> (downloaded once
    from the package index, as `make setup` downloads that sdist to build it)."""
    import llama_cpp

    from darwinlm.core.home import data_home

    root = data_home() / "llama-cpp-converter" / llama_cpp.__version__
    if (root / CONVERTER_PARTS[0]).is_file():
        return root / CONVERTER_PARTS[0]
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", scratch], check=True)
        sdist = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        staged = Path(scratch) / "converter"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inside = member.name.partition("/vendor/llama.cpp/")[2]
                wanted = any(inside == part or part.endswith("/") and inside.startswith(part)
                             for part in CONVERTER_PARTS)
                if member.isfile() and wanted and ".." not in Path(inside).parts:  # nothing lands outside
                    target = staged / inside
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        (staged / "stand_ins").mkdir()
        (staged / "stand_ins" / "sentencepiece.py").write_text(SENTENCEPIECE_STAND_IN)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(staged), root)  # whole, or not at all: a stopped download leaves no half converter
    return root / CONVERTER_PARTS[0]


def convert_with_llama_cpp(model_folder: Path, folder: Path) -> dict:
    """{quant: GGUF path} of the HF model in `model_folder`, as a llama.cpp user has it: f16 and q8_0 by
    convert_hf_to_gguf.py, q4_k_m by llama.cpp's quantizer from that f16."""
    from darwinlm.core.errors import DarwinLMError
    from darwinlm.core.export.gguf import quantize_with_llama_cpp

    script = llama_cpp_converter()
    converter = script.parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        str(path) for path in (converter / "gguf-py", converter, converter / "stand_ins"))}
    files = {}
    for quant in QUANTS[:2]:
        files[quant] = folder / f"dense-llama-cpp-{quant}.gguf"
        run = subprocess.run([sys.executable, str(script), str(model_folder), "--outtype", quant, "--outfile",
                              str(files[quant])], env=environment, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise DarwinLMError(f"llama.cpp's converter failed on {model_folder} at {quant}: {last}")
        print(f"converted {files[quant].name} with llama.cpp's converter", flush=True)
    files["q4_k_m"] = folder / "dense-llama-cpp-q4_k_m.gguf"
    quantize_with_llama_cpp(files["f16"], files["q4_k_m"], "q4_k_m")
    return files


def _uniform_model(model, tokenizer, split, digest: str, rows: int):
    """(`model` pruned in place to uniform 50% of bench.export's database, where it came from, kept fraction)."""
    from bench.database import uniform_levels
    from bench.export import build_database_timed
    from darwinlm.core.database.assembly import LiveAssembly

    database, _ = build_database_timed(model, tokenizer, split, rows, digest)
    assembly = LiveAssembly(model, database, base_model_digest=digest)
    assembly.apply(uniform_levels(database, 0.5))
    return model, f"uniform 50% of database {database.digest}", assembly.kept_params() / database.manifest[
        "dense_params"]


def _llama_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean next-token NLL) over windows (n, seq_len), each evaluated from an empty cache, as torch does."""
    llm = open_llama_cpp(path, threads, n_ctx=windows.shape[1], logits_all=True)
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32)).double()
        log_probs = torch.log_softmax(logits, dim=-1)
        total -= log_probs[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
        count += len(window) - 1
    del llm
    return float(np.exp(total / count))


def _prefill_tok_s(llm, prompt: list[int]) -> float:
    return len(prompt) / llama_cpp_prefill_seconds(llm, prompt)


def _decode_tok_s(llm, prompt: list[int], tokens: list[int]) -> float:
    """Tokens per second fed one at a time after `prompt` (which token comes next does not change the cost)."""
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for token in tokens:
        llm.eval([token])
    return len(tokens) / (time.perf_counter() - start)


def llama_cpp_speeds(files: dict, prompt: list[int], decode: list[int], reps: int, threads: int) -> dict:
    """Median prefill and decode tokens/s per (model, quant), repetitions interleaved in rotated order."""
    runners = {key: open_llama_cpp(path, threads, n_ctx=len(prompt) + len(decode) + 8)
               for key, path in files.items()}
    for llm in runners.values():  # first calls allocate buffers and page weights in: keep them out
        _prefill_tok_s(llm, prompt[:64])
    def measure(key) -> dict:
        return {"prefill": _prefill_tok_s(runners[key], prompt), "decode": _decode_tok_s(runners[key], prompt[:16], decode)}

    def progress(rep: int, latest: dict) -> None:
        print(f"rep {rep + 1}/{reps}: " + " ".join(
            f"{'/'.join(key)}={value['prefill']:.0f}|{value['decode']:.1f}" for key, value in latest.items()), flush=True)

    return interleaved_medians({key: (lambda key=key: measure(key)) for key in runners}, reps, warmup=False,
                               on_repeat=progress)


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8,
                        help="held-out 512-token test windows for perplexity, spread over the text")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per (model, quant); median")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens fed one at a time per decode timing")
    parser.add_argument("--rows", type=int, default=64, help="calibration rows if the database must be built")
    return parser.parse_args()


def _export_all(models: dict, tokenizer, folder: Path) -> dict:
    """{(model name, quant): GGUF path} for every model at every quant."""
    from darwinlm.core.export.gguf import export_gguf

    files = {}
    for name, model in models.items():
        for quant in QUANTS:
            path = folder / f"{name}-{quant}.gguf"
            start = time.perf_counter()
            export_gguf(model, tokenizer, str(path), quant=quant, metadata={"name": f"smollm2-{name}"})
            print(f"exported {path.name}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
                  flush=True)
            files[(name, quant)] = path
    return files


def main() -> None:
    apply_offline_defaults()
    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.data.windows import TEST, held_out_windows, windows_used
    from darwinlm.core.database.store import model_digest
    from darwinlm.core.evaluation.metrics import perplexity
    from darwinlm.core.model.loading import load_model, resolve_model_location

    args, started = _arguments(), time.perf_counter()
    origin = provenance(config=vars(args), seeds={"calibration_sample": 0})
    dense, tokenizer = load_model("smollm2")
    split, digest = default_split(), model_digest(dense)
    held_out = {split.in_domain: held_out_windows(split.evaluation[split.in_domain], tokenizer, 512, args.windows)}
    windows = held_out[split.in_domain].of(TEST)  # a reported figure: the test windows
    working, _ = load_model("smollm2")  # pruned in place to uniform 50%
    uniform, uniform_source, uniform_fraction = _uniform_model(working, tokenizer, split, digest, args.rows)
    pruned, pruned_source, kept_fraction = _shipped_model() or (uniform, uniform_source, uniform_fraction)
    # "dense" is the dense model as a llama.cpp user has it (llama.cpp's own converter), the denominator of every
    # speedup; DENSE_OURS is the same weights through darwinlm's writer, to show its `deci` path costs nothing.
    models = {DENSE_OURS: dense, "pruned": pruned, **({"uniform": uniform} if pruned is not uniform else {})}
    torch_ppl = {name: perplexity(model, windows) for name, model in models.items()}
    torch_ppl = {"dense": torch_ppl[DENSE_OURS], **torch_ppl}
    print(f"torch perplexity: {torch_ppl}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        files = _export_all(models, tokenizer, Path(scratch))
        converted = convert_with_llama_cpp(Path(resolve_model_location("smollm2")), Path(scratch))
        files.update({("dense", quant): path for quant, path in converted.items()})
        del dense, pruned, working, uniform, models
        ppl = {key: _llama_perplexity(path, windows, args.threads) for key, path in files.items()}
        print(f"llama.cpp perplexity: {ppl}", flush=True)
        load_before = os.getloadavg()
        decode_tokens = windows[1].tolist()[: args.decode_tokens]  # held-out text, fed one token at a time
        speed = llama_cpp_speeds(files, windows[0].tolist(), decode_tokens, args.reps, args.threads)
        sizes = {key: path.stat().st_size / 1e6 for key, path in files.items()}
    per_quant = {quant: {name: {"size_mb": sizes[(name, quant)], "ppl": ppl[(name, quant)],
                                "prefill_tok_s": speed[(name, quant)]["prefill"],
                                "decode_tok_s": speed[(name, quant)]["decode"]} for name in torch_ppl}
                 for quant in QUANTS}

    def ratio(kind: str, quant: str, name: str = "pruned") -> float:
        return speed[(name, quant)][kind] / speed[("dense", quant)][kind]

    uniform_ratios = {} if ("uniform", "f16") not in speed else {
        "uniform_model": uniform_source, "uniform_kept_block_fraction": uniform_fraction,
        **{f"uniform_{kind}_speedup_{quant}": ratio(kind, quant, "uniform")
           for kind in ("prefill", "decode") for quant in QUANTS}}
    results = {
        "model": "SmolLM2-135M-Instruct", "pruned_model": pruned_source, "kept_block_fraction": kept_fraction,
        "dense_model": "llama.cpp's convert_hf_to_gguf.py (f16, q8_0) and quantizer (q4_k_m), from the "
                       "llama-cpp-python sdist's vendored llama.cpp",
        "size_ratio_f16": sizes[("pruned", "f16")] / sizes[("dense", "f16")],
        "prefill_speedup_f16": ratio("prefill", "f16"), "decode_speedup_f16": ratio("decode", "f16"),
        "ppl_rel_diff_f16": max(abs(ppl[(name, "f16")] / torch_ppl[name] - 1) for name in torch_ppl),
        "combined_speedup_q4_vs_dense_f16": speed[("pruned", "q4_k_m")]["prefill"] / speed[("dense", "f16")]["prefill"],
        "combined_decode_speedup_q4_vs_dense_f16":
            speed[("pruned", "q4_k_m")]["decode"] / speed[("dense", "f16")]["decode"],
        **{f"prefill_speedup_{quant}": ratio("prefill", quant) for quant in QUANTS[1:]},
        **{f"decode_speedup_{quant}": ratio("decode", quant) for quant in QUANTS[1:]},
        **{f"{DENSE_OURS}_{kind}_ratio_{quant}": ratio(kind, quant, DENSE_OURS)
           for kind in ("prefill", "decode") for quant in QUANTS},
        **uniform_ratios, "torch_ppl": torch_ppl, "per_quant": per_quant,
        "eval": {"windows": int(windows.shape[0]), "seq_len": 512,
                 "set": f"{split.in_domain} ({split.label(split.in_domain)})"},
        "windows": windows_used(held_out, TEST),
        "load_average_during_timing": [load_before[0], os.getloadavg()[0]],
        "run_s": time.perf_counter() - started,
    }
    write_results("gguf", results, GOALS, origin=origin)


if __name__ == "__main__":
    main()
