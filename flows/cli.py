"""The `darwinlm` command line.

Every subcommand sets the offline/telemetry defaults before anything imports huggingface_hub, and turns a
DarwinLMError into one line on stderr and exit status 1 (argparse's usage errors exit 2, also on one line).
"""

import argparse
import json
import sys
from pathlib import Path
import tempfile

from darwinlm.flows.offline import apply_offline_defaults
from darwinlm.core.errors import DarwinLMError
# examples written per local lm-eval task (fewer if the held-out text holds fewer); --task-limit takes the first N
from darwinlm.core.evaluation.task_files import EXAMPLES_PER_TASK as LOCAL_TASK_EXAMPLES


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text",
        default=None,
        help="your own text instead of the default (State of the Union; Moby-Dick, e-mail and npm's manual held "
        "out): a folder of .txt files, a .jsonl file, or hf:NAME[:CONFIG]:SPLIT (needs a network); split into "
        "calibration/training/evaluation by document",
    )
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl / hf datasets")


# CompressParameters fields given their own option elsewhere (--preset, --model and the text options, shared with
# other commands) or through --set (settings).
OWN_OPTIONS = {"preset", "preset_file", "model", "text", "text_field", "settings"}


def _add_parameter_options(parser: argparse.ArgumentParser) -> None:
    """One option per remaining CompressParameters field, typed and described as the field is: the Prefect form
    and the command line read one declaration."""
    import typing

    from darwinlm.flows.parameters import CompressParameters

    for name, field in CompressParameters.model_fields.items():
        if name in OWN_OPTIONS:
            continue
        kinds = [kind for kind in typing.get_args(field.annotation) or (field.annotation,) if kind is not type(None)]
        choices = list(typing.get_args(kinds[0])) if typing.get_origin(kinds[0]) is typing.Literal else None
        parser.add_argument("--" + name.replace("_", "-"), default=field.default, choices=choices,
                            type=None if choices else kinds[0], help=field.description)


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="darwinlm",
        description="Structured pruning of language models with a training-aware evolutionary search (DarwinLM).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)

    evaluate = commands.add_parser(
        "evaluate",
        help="held-out perplexity of a model",
        description="Print token-level perplexity over fixed-length held-out windows of each evaluation set, "
        "named by its text: by default sotu (State of the Union 1990 on, the calibration text's domain), and out of "
        "domain moby (Moby-Dick), email (SpamAssassin ham) and npm_docs (npm's manual); with --text, in_domain "
        "(held out of that text). Text is never used for "
        "calibration or training.",
    )
    evaluate.add_argument("--model", required=True, help="`smollm2` (the cached default), a HF folder, or a hub id")
    _add_text_options(evaluate)
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    evaluate.add_argument("--windows", type=int, default=40,
                          help="test windows per evaluation set, spread over its whole text (default 40)")
    evaluate.add_argument("--batch-size", type=int, default=4,
                          help="windows (and lm-eval requests) per forward pass (default 4)")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument(
        "--tasks",
        default=None,
        help="also run lm-eval zero-shot tasks, comma-separated: `local` for the darwinlm_* tasks built from the "
        "held-out evaluation text (last-word cloze and next-sentence choice per evaluation set), darwinlm_* names, "
        "or standard lm-eval names such as arc_easy,hellaswag (these download their data: network needed)",
    )
    evaluate.add_argument("--task-limit", type=int, default=None,
                          help=f"examples per lm-eval task (default: all; local tasks hold {LOCAL_TASK_EXAMPLES})")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(handler=_evaluate)

    tasks = commands.add_parser(
        "tasks",
        help="write the offline zero-shot tasks to a folder, for `lm_eval --include_path DIR`",
        description="Write the darwinlm_* lm-eval tasks that `evaluate --tasks local` and the compress flow run "
        "(last-word cloze and next-sentence choice per held-out evaluation set: a YAML config and a JSONL file "
        "each) into a folder, and print the `lm_eval` command that runs them. The folder is written whole: a "
        "temporary folder beside it, renamed when complete (an earlier task folder there is replaced).",
    )
    tasks.add_argument("--out", required=True, help="the folder to write: new, empty, or an earlier task folder")
    _add_text_options(tasks)
    tasks.add_argument("--examples", type=int, default=LOCAL_TASK_EXAMPLES,
                       help=f"examples per task (default {LOCAL_TASK_EXAMPLES}; fewer where the held-out text "
                       "holds fewer)")
    tasks.add_argument("--seed", type=int, default=0, help="which examples and distractors are drawn (default 0)")
    tasks.set_defaults(handler=_write_tasks)

    compress = commands.add_parser(
        "compress",
        help="run a whole compression (database, search, post-training, evaluation, export) through Prefect",
        description="Compress a model with the DarwinLM pipeline as a Prefect flow, tracked in MLflow. A re-run "
        "of the same settings resumes where it stopped, or does nothing if it finished.",
    )
    compress.add_argument("--preset", default="smollm2-demo",
                          help="tiny, smollm2-demo (default; ~30 min on 2 CPU cores), paper, or a YAML file")
    compress.add_argument("--model", default=None, help="override the preset's model: `smollm2`, a HF folder, a hub id")
    _add_text_options(compress)
    _add_parameter_options(compress)
    compress.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                          help="any other preset option by its dotted name, e.g. --set search.accept_z=0.5 "
                          "(repeatable; values read as in a preset)")
    compress.add_argument("--json", action="store_true", help="print the run summary as JSON")
    compress.add_argument("--results", default=None, help="also write the summary table as JSON to this file")
    compress.set_defaults(handler=_compress)

    server = commands.add_parser("server", help="start a local Prefect server (UI on http://127.0.0.1:4200)",
                                 description="Runs `prefect server start --host 127.0.0.1` with telemetry off.")
    server.set_defaults(handler=lambda _args: _run_prefect("server", "start", "--host", "127.0.0.1"))
    mlflow_ui = commands.add_parser(
        "mlflow-ui", help="start the MLflow UI on darwinlm's tracking store (http://127.0.0.1:5000)",
        description="Runs `mlflow ui` on the store darwinlm tracks to (MLFLOW_TRACKING_URI, else sqlite under "
        "$DARWINLM_HOME) with telemetry off.")
    mlflow_ui.add_argument("--port", type=int, default=5000)
    mlflow_ui.set_defaults(handler=_mlflow_ui)
    worker = commands.add_parser(
        "worker",
        help="start a Prefect worker for darwinlm's deployments",
        description="Creates the `darwinlm` process work pool if needed, deploys deployments/prefect.yaml, "
        "and starts a worker on the pool. Needs a running server (`darwinlm server`) and PREFECT_API_URL.",
    )
    worker.set_defaults(handler=_worker)

    promote = commands.add_parser(
        "promote", help="point a registered model's current-<percent> alias at a version, by hand",
        description="A compression moves `current-<percent removed>` only to a version that beats its holder on the "
        "same held-out windows; this moves it to VERSION whatever the figures say (say, after comparing versions "
        "measured on different text). The alias is the version's fraction's unless --alias names one.")
    promote.add_argument("name", help="the registered model, e.g. smollm2-pruned")
    promote.add_argument("version", help="its version number")
    promote.add_argument("--alias", default=None, help="the alias to move (default: current-<percent removed>)")
    promote.set_defaults(handler=_promote)

    export = commands.add_parser(
        "export",
        help="write a pruned model as a Hugging Face folder or a GGUF file for llama.cpp",
        description="Apply a per-layer level assignment from a database to the model and save it as a Hugging "
        "Face folder (local path or any fsspec URI such as s3://bucket/prefix), or as one GGUF file that "
        "llama.cpp runs (--format gguf; then --database/--levels may be left out to convert --model as it is, "
        "e.g. a compact export folder).",
    )
    export.add_argument("--model", required=True, help="the base model the database was built from")
    export.add_argument("--database", default=None, help="database root (the folder holding manifest.json)")
    export.add_argument(
        "--levels",
        default=None,
        help='JSON file {"attn": [level per layer], "mlp": [level per layer]}, optionally with "database": '
        "the database digest it was chosen for",
    )
    export.add_argument("--out", required=True, help="output folder or URI (a .gguf file for --format gguf); "
                        "must not hold a model already")
    export.add_argument(
        "--format",
        default="compact",
        choices=["compact", "padded", "gguf"],
        help="compact: only kept weights, per-layer widths in config.json, modeling code via auto_map "
        "(load with trust_remote_code=True, or plainly after `darwinlm.core.register_pruned_classes()`); padded: the plain "
        "architecture with zeros for removed heads/channels, loads anywhere without custom code but is as "
        "big and as slow as the dense model; gguf: one file for llama.cpp (its `deci` architecture, per-layer "
        "head and FFN sizes; llama, mistral and qwen2 families)",
    )
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--quant", default="f16", help="GGUF weight type: f32, f16 (default), q8_0 or q4_k_m "
                        "(q4_k_m through llama.cpp's own quantizer)")
    export.set_defaults(handler=_export)
    return parser


def _run_prefect(*arguments: str, check: bool = True) -> int:
    return _run_tool("prefect", *arguments, check=check)


def _run_tool(name: str, *arguments: str, check: bool = True) -> int:
    """Run one of the venv's command-line tools in the foreground. Ctrl-C reaches it too (same process group):
    it shuts down, and we wait for that, then stop quietly rather than with a traceback of our own."""
    import shutil
    import subprocess

    executable = shutil.which(name) or str(Path(sys.executable).with_name(name))
    child = subprocess.Popen([executable, *arguments])
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = child.wait()
        print(f"darwinlm: {name} stopped", file=sys.stderr)
        return code
    if check and code != 0:
        raise DarwinLMError(f"`{name} {' '.join(arguments)}` exited with status {code}", "see its output above")
    return code


def _mlflow_ui(args) -> None:
    from darwinlm.tasks.tracking import mlflow_ui_arguments

    _run_tool("mlflow", *mlflow_ui_arguments(args.port))


def _promote(args) -> None:
    from mlflow import MlflowClient

    from darwinlm.tasks.registry import promote
    from darwinlm.tasks.tracking import tracking_uri

    decision = promote(MlflowClient(tracking_uri=tracking_uri()), args.name, args.version, args.alias)
    print(f"{args.name}@{decision.alias} is version {args.version}: {decision.reason}")


def _worker(_args) -> None:
    import os

    repository = Path(__file__).resolve().parent.parent
    os.environ.setdefault("DARWINLM_REPO", str(repository))
    os.environ.setdefault("DARWINLM_CHECKPOINTS", str(Path.home() / "checkpoints"))
    _run_prefect("work-pool", "create", "darwinlm", "--type", "process", check=False)  # exists already: fine
    _run_prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(repository / "deployments" / "prefect.yaml"))
    _run_prefect("worker", "start", "--pool", "darwinlm")


def _compress(args) -> None:
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a fresh sqlite needs it
    from darwinlm.flows.compress import CompressParameters, compress
    from darwinlm.flows.report import print_summary, write_results

    from pydantic import ValidationError

    from darwinlm.core.compression import preflight
    from darwinlm.core.config import parse_setting

    try:
        fields = {name: getattr(args, name) for name in CompressParameters.model_fields if name not in OWN_OPTIONS}
        parameters = CompressParameters.of(args.preset, model=args.model, text=args.text, text_field=args.text_field,
                                           settings=dict(map(parse_setting, args.settings)), **fields)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise DarwinLMError(f"{option} {first.get('input')!r}: {first['msg']}", "see `darwinlm compress --help`")
    preflight(parameters.config())  # bad preset, model, tokenizer or text fail here, before Prefect starts
    summary = compress(parameters)
    if args.results:
        write_results(summary, args.results)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print_summary(summary)


def _export(args) -> None:
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.store import Database
    from darwinlm.core.compression import export_metadata
    from darwinlm.core.export.huggingface import export_model, read_level_assignment
    from darwinlm.core.export.gguf import check_gguf_exportable, check_gguf_quant, export_gguf
    from darwinlm.core.model.loading import load_config, load_model

    gguf = args.format == "gguf"
    if gguf:  # quant, family and settings are checked before any weights are read
        check_gguf_quant(args.quant)
        check_gguf_exportable(load_config(args.model), args.quant)
    if (args.database is None) != (args.levels is None) or (args.database is None and not gguf):
        raise DarwinLMError("--database and --levels go together" + ("" if gguf else f" (and --format {args.format} "
                            "needs them)"), "pass both, or neither with --format gguf to convert --model as it is")
    database = Database.open(args.database) if args.database else None
    levels = read_level_assignment(args.levels, database) if database else None  # bad files fail before weights
    model, tokenizer = load_model(args.model)
    metadata = {"name": Path(args.out.rstrip("/")).stem}
    if database is not None:
        assembly = LiveAssembly(model, database)
        assembly.apply(levels, masked=args.format == "padded")
        metadata.update(export_metadata(database, levels, assembly.kept_params()))
    if gguf:
        export_gguf(model, tokenizer, args.out, quant=args.quant, metadata=metadata)
    else:
        export_model(model, tokenizer, args.out, export_format=args.format, dtype=args.dtype, metadata=metadata)
    kept = (f" ({metadata['kept_block_params'] / metadata['dense_block_params']:.1%} of block parameters kept)"
            if database is not None else "")
    print(f"exported {args.format}{f' {args.quant}' if gguf else ''} model to {args.out}{kept}")


def _evaluate(args) -> None:
    from darwinlm.core.data.default_corpus import load_split
    from darwinlm.core.data.windows import TEST, WINDOWS_PROTOCOL, held_out_windows
    from darwinlm.core.evaluation.metrics import perplexity_with_se, with_se
    from darwinlm.core.evaluation.lm_eval_run import run_lm_eval
    from darwinlm.core.model.loading import load_model

    if args.seq_len < 2 or args.windows < 1 or args.batch_size < 1:
        raise DarwinLMError("--seq-len must be ≥ 2 and --windows, --batch-size ≥ 1")
    requested = _parse_tasks(args.tasks, args.task_limit)
    split = load_split(args.text, args.text_field)
    with tempfile.TemporaryDirectory(prefix="darwinlm-tasks-") as task_dir:
        if requested:  # tasks first: a typo in --tasks fails before any model is loaded
            names, manager = _prepare_tasks(requested, split, task_dir)
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        results = {}
        for name, documents in split.evaluation.items():  # a reported figure: the test windows, as compress reads
            held_out = held_out_windows(documents, tokenizer, args.seq_len, args.windows)
            ppl, se = perplexity_with_se(model, held_out.of(TEST), batch_size=args.batch_size,
                                         progress=not args.json, desc=name)
            results[name] = {"perplexity": ppl, "perplexity_se": se, "windows": held_out.describe(TEST)["count"],
                             "tokens": int(held_out.of(TEST).numel()), "split": TEST,
                             "spread_over_tokens": held_out.describe(TEST)["spread_over_tokens"]}
        tasks = {}
        if requested:
            tasks = run_lm_eval(model, tokenizer, names, include_path=task_dir, batch_size=args.batch_size,
                                limit=args.task_limit, device=str(next(model.parameters()).device),
                                task_manager=manager)
    if args.json:
        extra = {"tasks": tasks} if requested else {}
        print(json.dumps({"model": args.model, "split_digest": split.digest, "windows_protocol": WINDOWS_PROTOCOL,
                          "in_domain": split.in_domain, "results": results, **extra}))
        return
    print(f"model {args.model} · split {split.digest[:12]} · {args.seq_len}-token {TEST} windows "
          f"({WINDOWS_PROTOCOL}: spread over the whole text)")
    print(f"{'evaluation set':<16} {'windows':>8} {'perplexity ± se':>18}  domain")
    for name, row in results.items():  # in domain: the calibration text's own; the rest is out of domain
        domain = "in" if name == split.in_domain else "out"
        print(f"{name:<16} {row['windows']:>8} {with_se(row, 'perplexity'):>18}  {domain} ({split.label(name)})")
    if requested:
        _print_task_table(tasks)


def _write_tasks(args) -> None:
    """`darwinlm tasks`: the local tasks written whole into --out (see write_task_folder), and how to run them."""
    from darwinlm.core.data.default_corpus import load_split
    from darwinlm.core.evaluation.task_files import MANIFEST_NAME, check_task_folder, write_task_folder

    if args.examples < 1:
        raise DarwinLMError(f"--examples is {args.examples}", "pass a positive number of examples per task")
    check_task_folder(args.out)  # before the text is read
    split = load_split(args.text, args.text_field)
    out = Path(args.out).expanduser().resolve()
    names = write_task_folder(split, out, examples_per_task=args.examples, seed=args.seed)
    counts = json.loads((out / MANIFEST_NAME).read_text())["tasks"]
    print(f"wrote {len(names)} lm-eval tasks to {out} (split {split.digest[:12]}, seed {args.seed}):")
    for name in names:
        print(f"  {name:<40} {counts[name]:>6} examples")
    print("run them with (MODEL: a Hugging Face folder or hub id; trust_remote_code=True loads darwinlm's "
          "pruned exports):")
    print(f"  lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True --tasks {','.join(names)} "
          f"--include_path {out} --device cpu --batch_size 8")


def _parse_tasks(tasks: str | None, limit: int | None) -> list[str]:
    """--tasks as a list of names ([] when not given); `local` stays a placeholder for the written tasks."""
    if limit is not None and limit < 1:
        raise DarwinLMError(f"--task-limit is {limit}", "pass a positive number of examples per task")
    if tasks is None:
        if limit is not None:
            raise DarwinLMError("--task-limit needs --tasks", "add e.g. --tasks local")
        return []
    from darwinlm.core.evaluation.task_files import task_names

    names = task_names(tasks)
    if not names:
        raise DarwinLMError(f"--tasks {tasks!r} names no task", "pass e.g. --tasks local or --tasks local,arc_easy")
    return names


def _prepare_tasks(requested: list[str], split, task_dir: str):
    """Write the local tasks of `split` into task_dir; (task names with `local` expanded, checked TaskManager)."""
    from darwinlm.core.evaluation.lm_eval_run import task_manager_for
    from darwinlm.core.evaluation.task_files import expand_local, write_local_tasks

    names = expand_local(requested, write_local_tasks(split, task_dir, examples_per_task=LOCAL_TASK_EXAMPLES))
    return names, task_manager_for(names, task_dir)


def _print_task_table(tasks: dict[str, dict[str, float]]) -> None:
    """lm-eval figures: accuracies as fractions ± their standard error; chance is 0 for the cloze, 0.25 for
    next-sentence choice."""
    from darwinlm.core.evaluation.metrics import with_se

    columns = ["acc", "acc_norm", "perplexity"]
    width = max(len("lm-eval task"), *(len(name) for name in tasks))
    print(f"\n{'lm-eval task':<{width}} {'examples':>8} " + " ".join(f"{column:>16}" for column in columns))
    for name, metrics in tasks.items():
        cells = [f"{with_se(metrics, column, '.3f'):>16}" if column in metrics else f"{'-':>16}" for column in columns]
        print(f"{name:<{width}} {metrics.get('examples', 0):>8.0f} " + " ".join(cells))


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
