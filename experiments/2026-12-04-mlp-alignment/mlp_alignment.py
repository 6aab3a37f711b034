"""How llama.cpp's CPU speed depends on the MLP width's alignment, on a SmolLM2-shaped model.

Writes a GGUF with darwinlm's exporter per MLP width (every layer the same width; random weights: speed does not
depend on the values) and times a prefill (and optionally a short decode) in llama-cpp-python, each width's
models loaded once and the widths interleaved over rounds (median per width). On a shared, loaded machine use one
thread: llama.cpp's threads spin at a barrier after every op, so with two threads each op waits for whichever
thread the scheduler took away, and that noise swamps the effect measured. Also times the MLP alone
in torch (float32, 512 tokens). Widths near half of 1536, each aligned to a different power of two:
768 (256), 736 (32), 704 (64), 752 (16), 760 (8), 764 (4), 767 (1); and the dense 1536.

    .venv/bin/python experiments/2026-12-04-mlp-alignment/mlp_alignment.py --threads 1 --prompt 256 --decode 0
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from darwinlm.core.export.gguf import export_gguf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.support.tiny_models import tiny_bpe_tokenizer  # noqa: E402  (a byte-level BPE the exporter accepts)

WIDTHS = (1536, 768, 736, 704, 752, 760, 764, 767)
QUANTS = ("f16", "q8_0")
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True)


def alignment_of(width: int) -> int:
    """The largest power of two dividing `width` (capped at 256)."""
    return min(width & -width, 256)


def write_model(width: int, folder: Path, quant: str, tokenizer) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(intermediate_size=width, **SMOLLM2)).eval()
    path = folder / f"w{width}-{quant}.gguf"
    export_gguf(model, tokenizer, str(path), quant=quant)
    return path


def time_llama(llm, prompt: list[int], decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one fresh evaluation."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(decode):
        llm.eval([prompt[step]])
    return len(prompt) / prefill, decode / (time.perf_counter() - start) if decode else float("nan")


def time_torch_mlp(width: int, tokens: int, repeats: int) -> float:
    """Median seconds of one SwiGLU MLP forward (576 → width → 576) on `tokens` rows, float32."""
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(576, width, bias=False), torch.nn.Linear(576, width, bias=False),
                      torch.nn.Linear(width, 576, bias=False))
    x = torch.randn(tokens, 576)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            down(torch.nn.functional.silu(gate(x)) * up(x))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    parser.add_argument("--gguf-dir", default=None, help="keep (and reuse) the GGUF files here")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tokenizer = tiny_bpe_tokenizer()
    prompt = [int(t) for t in torch.randint(2, 290, (args.prompt,), generator=torch.Generator().manual_seed(0))]
    samples = {(w, q): [] for w in WIDTHS for q in QUANTS}
    with tempfile.TemporaryDirectory(prefix="mlp-alignment-") as scratch:
        folder = Path(args.gguf_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        models = {}
        for width in WIDTHS:
            for quant in QUANTS:
                path = folder / f"w{width}-{quant}.gguf"
                if not path.exists():
                    write_model(width, folder, quant, tokenizer)
                models[(width, quant)] = llama_cpp.Llama(
                    model_path=str(path), n_ctx=args.prompt + args.decode, n_batch=args.prompt, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
                time_llama(models[(width, quant)], prompt[:64], 2)  # warm-up: page in the weights
        for round_index in range(args.rounds):
            for key, llm in models.items():
                samples[key].append(time_llama(llm, prompt, args.decode))
            print(f"round {round_index + 1}/{args.rounds}", {f"{w}-{q}": round(s[-1][0]) for (w, q), s in samples.items()},
                  flush=True)
    rows = []
    for (width, quant), runs in samples.items():
        dense = samples[(1536, quant)]
        prefill = statistics.median(r[0] for r in runs)
        rows.append({"width": width, "alignment": alignment_of(width), "quant": quant,
                     "prefill_tok_s": round(prefill, 1),
                     "decode_tok_s": round(statistics.median(r[1] for r in runs), 1) if args.decode else None,
                     "prefill_vs_dense": round(prefill / statistics.median(r[0] for r in dense), 3),
                     "prefill_samples": [round(r[0], 1) for r in runs]})
    torch_rows = [{"width": w, "alignment": alignment_of(w),
                   "mlp_ms": round(1e3 * time_torch_mlp(w, args.prompt, 30), 3)} for w in WIDTHS]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"question": "llama.cpp CPU prefill/decode and torch MLP time against MLP width alignment",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "llama_cpp_python": llama_cpp.__version__, "rounds": args.rounds, "prompt_tokens": args.prompt,
              "decode_tokens": args.decode, "llama_cpp": rows, "torch_mlp": torch_rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in rows:
        print(row)
    for row in torch_rows:
        print(row)


if __name__ == "__main__":
    main()
