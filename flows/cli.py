"""The `darwinlm` command line.

Every subcommand sets the offline/telemetry defaults before anything imports huggingface_hub, and turns a
DarwinLMError into one line on stderr and exit status 1 (argparse's usage errors exit 2, also on one line).
"""

import argparse
import json
import sys

from darwinlm_core.environment import apply_offline_defaults
from darwinlm_core.errors import DarwinLMError


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text",
        default=None,
        help="your own text instead of the default (State of the Union + Moby-Dick): a folder of .txt files, "
        "a .jsonl file, or hf:NAME[:CONFIG]:SPLIT (needs a network); split into calibration/training/evaluation "
        "by document",
    )
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl / hf datasets")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="darwinlm",
        description="Structured pruning of language models with a training-aware evolutionary search (DarwinLM).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)

    evaluate = commands.add_parser(
        "evaluate",
        help="held-out perplexity of a model",
        description="Print token-level perplexity over fixed-length held-out windows: in-domain (State of the "
        "Union 1990 on, by default) and out-of-domain (Moby-Dick). Text is never used for calibration or training.",
    )
    evaluate.add_argument("--model", required=True, help="`smollm2` (the cached default), a HF folder, or a hub id")
    _add_text_options(evaluate)
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    evaluate.add_argument("--windows", type=int, default=40, help="windows per evaluation set (default 40)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(handler=_evaluate)

    export = commands.add_parser(
        "export",
        help="write a pruned model as a Hugging Face folder",
        description="Apply a per-layer level assignment from a database to the model and save it as a Hugging "
        "Face folder (local path or any fsspec URI such as s3://bucket/prefix).",
    )
    export.add_argument("--model", required=True, help="the base model the database was built from")
    export.add_argument("--database", required=True, help="database root (the folder holding manifest.json)")
    export.add_argument(
        "--levels",
        required=True,
        help='JSON file {"attn": [level per layer], "mlp": [level per layer]}, optionally with "database": '
        "the database digest it was chosen for",
    )
    export.add_argument("--out", required=True, help="output folder or URI; must not hold a model already")
    export.add_argument(
        "--format",
        default="compact",
        choices=["compact", "padded"],
        help="compact: only kept weights, per-layer widths in config.json, modeling code via auto_map "
        "(load with trust_remote_code=True, or plainly after `import darwinlm_core`); padded: the plain "
        "architecture with zeros for removed heads/channels, loads anywhere without custom code but is as "
        "big and as slow as the dense model",
    )
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.set_defaults(handler=_export)
    return parser


def _export(args) -> None:
    from darwinlm_core.assembly import LiveAssembly
    from darwinlm_core.database import Database
    from darwinlm_core.export import export_model, read_level_assignment
    from darwinlm_core.models import load_model

    database = Database.open(args.database)
    levels = read_level_assignment(args.levels, database)  # before loading weights: bad files fail fast
    model, tokenizer = load_model(args.model)
    assembly = LiveAssembly(model, database)
    assembly.apply(levels, masked=args.format == "padded")
    layers = range(database.manifest["base_model"]["num_layers"])
    metadata = {"database": database.digest, "base_model_digest": database.manifest["base_model"]["digest"],
                "levels": {kind: [levels[(i, kind)] for i in layers] for kind in ("attn", "mlp")},
                "kept_block_params": assembly.kept_params(), "dense_block_params": database.manifest["dense_params"]}
    export_model(model, tokenizer, args.out, export_format=args.format, dtype=args.dtype, metadata=metadata)
    fraction = assembly.kept_params() / database.manifest["dense_params"]
    print(f"exported {args.format} model to {args.out} ({fraction:.1%} of block parameters kept)")


def _evaluate(args) -> None:
    from darwinlm_core.data import default_split, read_documents, split_documents, tokenize_blocks
    from darwinlm_core.evaluation import perplexity
    from darwinlm_core.models import load_model

    if args.seq_len < 2 or args.windows < 1 or args.batch_size < 1:
        raise DarwinLMError("--seq-len must be ≥ 2 and --windows, --batch-size ≥ 1")
    split = default_split() if args.text is None else split_documents(read_documents(args.text, args.text_field))
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    results = {}
    for name, documents in split.evaluation.items():
        windows = tokenize_blocks(documents, tokenizer, args.seq_len, max_blocks=args.windows)
        ppl = perplexity(model, windows, batch_size=args.batch_size, progress=not args.json, desc=name)
        results[name] = {"perplexity": ppl, "windows": int(windows.shape[0]), "tokens": int(windows.numel())}
    if args.json:
        print(json.dumps({"model": args.model, "split_digest": split.digest, "results": results}))
        return
    print(f"model {args.model} · split {split.digest[:12]} · {args.seq_len}-token windows")
    print(f"{'evaluation set':<16} {'windows':>8} {'perplexity':>12}")
    for name, row in results.items():
        print(f"{name:<16} {row['windows']:>8} {row['perplexity']:>12.2f}")


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = _build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DarwinLMError as error:
        print(f"darwinlm: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
