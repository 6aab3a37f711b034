"""llama.cpp speed of the demo variants' shipped models against dense (llama.cpp's own converter), timed in the
same interleaved rounds as bench.gguf (2 threads, one 512-token prompt, 64 decoded tokens, f16 and q8_0).

    PYTHONPATH=. .venv/bin/python experiments/2026-12-05-demo-budget-and-ladders/speed.py NAME=RUN_FOLDER ...

Prints one JSON object: per model and quant, prefill and decode tokens/s and their ratio to dense.
"""

import json
import sys
import tempfile
from pathlib import Path

from bench.gguf import convert_with_llama_cpp, llama_cpp_speeds
from darwinlm.flows.offline import apply_offline_defaults

QUANTS = ("f16", "q8_0")


def main() -> None:
    apply_offline_defaults()
    from transformers import AutoModelForCausalLM

    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.data.windows import TEST, held_out_windows
    from darwinlm.core.export.gguf import export_gguf
    from darwinlm.core.model.loading import load_tokenizer, resolve_model_location

    runs = dict(argument.split("=", 1) for argument in sys.argv[1:])
    tokenizer = load_tokenizer("smollm2")
    split = default_split()
    windows = held_out_windows(split.evaluation[split.in_domain], tokenizer, 512, 8).of(TEST)
    with tempfile.TemporaryDirectory(prefix="demo-speed-") as scratch:
        converted = convert_with_llama_cpp(Path(resolve_model_location("smollm2")), Path(scratch))
        files = {("dense", quant): converted[quant] for quant in QUANTS}
        shapes = {}
        for name, run in runs.items():
            model = AutoModelForCausalLM.from_pretrained(Path(run) / "model", trust_remote_code=True).eval()
            shapes[name] = json.loads((Path(run) / "model" / "darwinlm.json").read_text()).get("kept_block_params")
            for quant in QUANTS:
                files[(name, quant)] = Path(scratch) / f"{name}-{quant}.gguf"
                export_gguf(model, tokenizer, str(files[(name, quant)]), quant=quant)
        speed = llama_cpp_speeds(files, windows[0].tolist(), windows[1].tolist()[:64], reps=5, threads=2)
    out = {name: {"kept_block_params": shapes[name], **{
        f"{kind}_speedup_{quant}": speed[(name, quant)][kind] / speed[("dense", quant)][kind]
        for kind in ("prefill", "decode") for quant in QUANTS}} for name in runs}
    out["dense_tok_s"] = {quant: speed[("dense", quant)] for quant in QUANTS}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
