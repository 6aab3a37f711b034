"""The model card (README.md) of an exported folder: where the model came from, what was kept, how it scores,
and how to run it in transformers and in llama.cpp.

It is rendered from the folder's own config.json and darwinlm.json, so it can be rewritten once held-out
figures are known (the compress flow evaluates after exporting) without touching the weights.
"""

import json

from darwinlm.core import uri_io
from darwinlm.core.evaluation.metrics import is_se_key, with_se

# The figures other than perplexities, which are one per evaluation set (`ppl_<set>`) and labelled by the set.
_FIGURE_LABELS = {"kl": "KL to the dense model per token", "zeroshot_acc": "zero-shot accuracy (mean)",
                  "params": "parameters", "prefill_tokens_per_s": "prefill tokens/s (transformers, CPU)"}


def _widths_table(config: dict) -> list[str]:
    heads = config.get("layer_query_heads")
    if heads is None:
        return ["Every layer keeps its dense width (no per-layer lists in config.json)."]
    lines = ["| layer | query heads | KV heads | MLP width |", "|---|---|---|---|"]
    for index, (query, kv, width) in enumerate(zip(heads, config["layer_kv_heads"],
                                                   config["layer_intermediate_sizes"])):
        lines.append(f"| {index} | {query} | {kv} | {width} |")
    return lines


def _evaluation_table(evaluation: dict | None) -> list[str]:
    if not evaluation or "dense" not in evaluation or "pruned" not in evaluation:
        return ["Not measured when this folder was written; `darwinlm evaluate --model THIS_FOLDER` measures "
                "held-out perplexity."]
    lines = ["| metric | dense (before) | pruned (after) |", "|---|---|---|"]
    for key, label in _row_labels(evaluation).items():
        if key in evaluation["dense"] and key in evaluation["pruned"]:
            cells = [with_se(evaluation[side], key, ",.4g") for side in ("dense", "pruned")]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    if "windows" in evaluation:  # which held-out windows: test ones, never used to choose anything
        sets = ", ".join(f"{name}: {used['count']} windows over {used['spread_over_tokens']:,} tokens"
                         for name, used in evaluation["windows"]["sets"].items())
        lines += ["", f"Perplexities and KL on the {evaluation['windows']['split']} windows ({sets})."]
    return lines


def _row_labels(evaluation: dict) -> dict[str, str]:
    """Figure key → its row's label: a perplexity per evaluation set, named by the set's text and whether it is
    the calibration text's own domain (from the evaluation's `labels` and `in_domain`, when it records them),
    then the other figures."""
    labels, in_domain = evaluation.get("labels", {}), evaluation.get("in_domain")
    perplexities = {}
    for key in evaluation["dense"]:
        if key.startswith("ppl_") and not is_se_key(key):
            name = key.removeprefix("ppl_")
            domain = "" if in_domain is None else " (in domain)" if name == in_domain else " (out of domain)"
            perplexities[key] = f"perplexity, {labels.get(name, name)}{domain}"
    return {**perplexities, **_FIGURE_LABELS}


def render_card(config: dict, info: dict, evaluation: dict | None = None) -> str:
    """README.md text from an export's config.json (`config`) and darwinlm.json (`info`) as dicts."""
    kept, dense = info.get("kept_block_params"), info.get("dense_block_params")
    kept_line = f"{kept:,} of {dense:,} decoder-block parameters ({kept / dense:.1%})" if kept and dense else "unknown"
    settings = {key: info[key] for key in ("database", "genome", "config_digest", "levels") if key in info}
    base = info.get("base_model", "the base model")
    lines = [
        "---", "library_name: transformers", "tags: [darwinlm, structured-pruning]", "---", "",
        f"# {info.get('name', 'Pruned model')} (darwinlm)", "",
        f"Structurally pruned from **{base}** (content digest `{info.get('base_model_digest', 'unknown')}`) by "
        "darwinlm: DarwinLM (arXiv 2502.07780), a training-aware evolutionary search over per-layer levels of "
        "attention heads and MLP channels pruned by structured OBS.", "",
        "## Method and settings", "",
        f"- export format: {info.get('format', 'compact')}",
        *(f"- {key}: `{json.dumps(value)}`" for key, value in settings.items()),
        f"- kept: {kept_line}" + (f"; {info['total_params']:,} parameters in all" if "total_params" in info else ""),
        "", "## Per-layer widths", "", *_widths_table(config), "",
        "## Held-out evaluation", "", *_evaluation_table(evaluation), "",
        "## Use in transformers", "", "```python",
        "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
        "# trust_remote_code runs the folder's modeling_pruned.py; after darwinlm.core.register_pruned_classes() it is not needed",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)",
        "tokenizer = PreTrainedTokenizerFast.from_pretrained(FOLDER)",
        "```", "",
        "## Run in llama.cpp", "",
        "```bash",
        "darwinlm export --format gguf --quant q8_0 --model FOLDER --out model.gguf   # per-layer shapes, one file",
        "```", "",
        "Then with llama-cpp-python (or a native llama.cpp build: `llama-cli -m model.gguf`):", "",
        "```python",
        "from llama_cpp import Llama",
        "llm = Llama(model_path=\"model.gguf\", n_threads=2)",
        "reply = llm.create_chat_completion([{\"role\": \"user\", \"content\": \"Hello\"}])",
        "print(reply[\"choices\"][0][\"message\"][\"content\"])",
        "```", "",
    ]
    return "\n".join(lines)


def write_model_card(folder_uri: str, evaluation: dict | None = None) -> str:
    """(Re)write FOLDER/README.md from the folder's config.json and darwinlm.json; returns its URI."""
    config = json.loads(uri_io.read_bytes(uri_io.join(folder_uri, "config.json")))
    info_uri = uri_io.join(folder_uri, "darwinlm.json")
    info = json.loads(uri_io.read_bytes(info_uri)) if uri_io.exists(info_uri) else {}
    uri = uri_io.join(folder_uri, "README.md")
    uri_io.write_bytes(uri, render_card(config, info, evaluation).encode())
    return uri
