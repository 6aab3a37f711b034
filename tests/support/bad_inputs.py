"""The bad-input catalogue: each case builds its bad input under a folder, runs the `darwinlm` CLI in this
process, and must end with one `darwinlm: error:` line on stderr, a non-zero exit, and nothing written at
the output location. Shared by tests/test_bad_inputs.py and bench/reliability.py.
"""

import contextlib
import errno
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDS = "the state of the union is strong and people will work together for the nation future economy peace".split()


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # builds the bad input under the folder, returns the CLI arguments
    expect: str  # a fragment of the error line
    exit_code: int = 1
    patch: Callable | None = None  # (monkeypatch) -> None, for faults that cannot be files (a full disk)


def _tiny(folder: Path, seed: int = 0, **overrides) -> Path:
    from tests.support.tiny_models import tiny_model, tiny_tokenizer

    if not (folder / "config.json").exists():
        tiny_model("llama", seed=seed, **overrides).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def _corpus(folder: Path, documents: int = 60, words: int = 300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(documents):
        (folder / f"doc_{index:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + ".")
    return folder


def _compress(root: Path, *extra: str, model: Path | None = None, text: Path | None = None) -> list[str]:
    return ["compress", "--preset", "tiny", "--model", str(model or _tiny(root / "model")),
            "--text", str(text or _corpus(root / "corpus")), "--store", str(root / "out"), *extra]


def _database(root: Path) -> Path:
    """A tiny model's database (built once per folder) and a level file for it; returns the database root."""
    from darwinlm.core.database.store import DatabaseConfig, build_database
    from darwinlm.core.model.loading import load_model
    from tests.support.tiny_models import random_token_rows

    model, _ = load_model(str(_tiny(root / "model")))
    database = build_database(model, random_token_rows(128, 8, 16), str(root / "databases"), calibration_digest="c",
                              config=DatabaseConfig(level_steps=3, storage_dtype="float32"))
    layers = database.manifest["base_model"]["num_layers"]
    (root / "levels.json").write_text(json.dumps({"attn": [1] * layers, "mlp": [1] * layers}))
    return Path(database.root)


def _export(root: Path, database: Path, model: Path | None = None) -> list[str]:
    return ["export", "--model", str(model or root / "model"), "--database", str(database),
            "--levels", str(root / "levels.json"), "--out", str(root / "out")]


def _damaged_shard(root: Path, damage: Callable[[bytes], bytes]) -> list[str]:
    database = _database(root)
    shard = sorted(database.glob("layers/*/mlp/level_01.safetensors"))[0]
    shard.write_bytes(damage(shard.read_bytes()))
    return _export(root, database)


def _other_code_version(root: Path) -> list[str]:
    database = _database(root)
    manifest = json.loads((database / "manifest.json").read_text())
    manifest["code_version"] = "darwinlm-0.0.1/db-schema-0"
    (database / "manifest.json").write_text(json.dumps(manifest))
    return _export(root, database)


def _unsupported(root: Path) -> list[str]:
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2).save_pretrained(root / "gpt2")
    return _compress(root, model=root / "gpt2")


def _binary_corpus(root: Path) -> list[str]:
    folder = _corpus(root / "corpus")
    (folder / "weights.txt").write_bytes(b"\x00\x01\x02binary\xff" * 10)
    return _compress(root, text=folder)


def _empty_corpus(root: Path) -> list[str]:
    (root / "empty").mkdir()
    (root / "empty" / "blank.txt").write_text("  \n")
    return _compress(root, text=root / "empty")


def _preset(root: Path, text: str) -> list[str]:
    (root / "preset.yaml").write_text(text)
    return _compress(root)[:2] + [str(root / "preset.yaml")] + _compress(root)[3:]


def _disk_full(monkeypatch) -> None:
    from fsspec.implementations.local import LocalFileSystem

    real = LocalFileSystem.pipe_file

    def full(self, path, value, **kwargs):
        if "/out" in str(path):  # the output location's disk is full; reading inputs still works
            real(self, path, value[: len(value) // 2], **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, value, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", full)


CASES = [
    Case("missing_model", lambda r: _compress(r, model=r / "nope"), "does not exist"),
    Case("unsupported_architecture", _unsupported, "unsupported architecture 'gpt2'"),
    Case("target_out_of_range", lambda r: _compress(r, "--fraction-removed", "1.0"), "--fraction-removed 1.0"),
    Case("target_negative", lambda r: _compress(r, "--fraction-removed", "-0.2"), "--fraction-removed -0.2"),
    Case("corpus_empty", _empty_corpus, "empty"),
    Case("corpus_too_small", lambda r: _compress(r, text=_corpus(r / "small", documents=40, words=8)), "rows"),
    Case("corpus_not_text", _binary_corpus, "weights.txt"),
    Case("tokenizer_model_mismatch",
         lambda r: _compress(r, model=_tiny(r / "mismatch", vocab_size=64)), "tokenizer"),
    Case("database_other_model", lambda r: _export(r, _database(r), model=_tiny(r / "other", seed=9)),
         "built from another model"),
    Case("database_other_code_version", _other_code_version, "was built by darwinlm-0.0.1"),
    Case("shard_truncated", lambda r: _damaged_shard(r, lambda data: data[: len(data) // 2]), "corrupted"),
    Case("shard_corrupted", lambda r: _damaged_shard(r, lambda data: data[:-8] + b"\xff" * 8), "corrupted"),
    Case("levels_wrong_length", lambda r: (_export(r, _database(r)),
                                           (r / "levels.json").write_text('{"attn": [1], "mlp": [1]}'))[0],
         "needs a list of"),
    Case("preset_malformed", lambda r: _preset(r, "search: {generations: [unclosed\n"), "preset"),
    Case("preset_unknown_option", lambda r: _preset(r, "search:\n  generatoins: 3\n"), "generatoins"),
    Case("unknown_cli_option", lambda r: _compress(r, "--generatoins", "3"), "unrecognized arguments", exit_code=2),
    Case("disk_full", lambda r: _export(r, _database(r)), "no space left", patch=_disk_full),
]


def run_case(case: Case, root: Path, monkeypatch) -> dict:
    """Run one case under `root`; returns what the campaign counts."""
    from darwinlm.flows.cli import main

    root.mkdir(parents=True, exist_ok=True)
    argv = case.argv(root)
    if case.patch is not None:
        case.patch(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
    lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("darwinlm: error: ")]
    out = root / "out"
    wrote = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    return {"case": case.name, "exit_code": code, "error": error_lines[-1] if error_lines else lines[-1:],
            "clean_error": (code == case.exit_code and len(error_lines) == 1 and lines[-1] == error_lines[0]
                            and case.expect in error_lines[0]),
            "wrote": wrote}
