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
    return parser


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
