"""Read text documents: a folder of .txt files, a .jsonl file, or `hf:NAME[:CONFIG]:SPLIT` (needs a network).

A `Document` is the unit that splits never cut: see darwinlm.core.data.splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from darwinlm.core.errors import DarwinLMError

HF_PREFIX = "hf:"
TEXT_FIELD_FIX = "pass --text-field with the name of the field that holds the text"


def text_sha256(text: str) -> str:
    """sha256 hex of a text's UTF-8 bytes: how documents are compared by content and digested."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    """One unit of text, never split across roles. `id` is unique within a corpus (relative path, file:line, ...)."""

    id: str
    text: str


def read_documents(source: str | Path, text_field: str = "text") -> list[Document]:
    """Read a corpus: a folder of .txt files (recursive; id = relative path, sorted), a single .txt file,
    a .jsonl file (one JSON object per line; id = `file:line`), or `hf:NAME[:CONFIG]:SPLIT`.

    Blank documents are dropped; a corpus with nothing but blank documents is an error.
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        documents = _read_hf(source[len(HF_PREFIX):], text_field)
    else:
        documents = _read_path(Path(source).expanduser(), text_field)
    kept = [doc for doc in documents if doc.text.strip()]
    if not kept:
        raise DarwinLMError(
            f"the corpus {source} is empty: all {len(documents)} documents are blank",
            "point --text at a folder or file that holds text",
        )
    return kept


def _read_path(path: Path, text_field: str) -> list[Document]:
    if not path.exists():
        raise DarwinLMError(
            f"no such file or folder: {path}",
            "pass an existing folder of .txt files, a .jsonl file, or hf:NAME[:CONFIG]:SPLIT",
        )
    if path.is_dir():
        return _read_text_folder(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if path.suffix == ".txt":
        return [Document(path.name, _decode(path.read_bytes(), str(path)))]
    raise DarwinLMError(
        f"{path} is neither a folder of .txt files, a .txt file nor a .jsonl file",
        "pass a folder of .txt files, a .jsonl file (one JSON object per line), or hf:NAME[:CONFIG]:SPLIT",
    )


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text of a file's bytes (a leading BOM dropped); binary or other encodings are the user's to fix."""
    if b"\x00" in data:  # UTF-8 text never holds NUL; binary files and UTF-16 do
        raise DarwinLMError(f"{where} looks binary (it contains NUL bytes)", "remove it, or convert it to UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DarwinLMError(
            f"{where} is not UTF-8 text (bad byte at offset {error.start})",
            "convert it to UTF-8 (e.g. `iconv -t UTF-8`) or remove it",
        ) from None


def _read_text_folder(folder: Path) -> list[Document]:
    # Hidden folders (.git, .ipynb_checkpoints) hold copies, not corpus; sorting by relative path fixes the order.
    found = sorted(
        (path.relative_to(folder).as_posix(), path)
        for path in folder.rglob("*.txt")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not found:
        raise DarwinLMError(f"no .txt files in {folder}", "put .txt files there, or pass a .jsonl file")
    return [Document(name, _decode(path.read_bytes(), str(path))) for name, path in found]


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    documents = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            line = _decode(raw, where)
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) are not documents
            documents.append(Document(f"{path.name}:{number}", _text_of_record(line, where, text_field)))
    return documents


def _text_of_record(line: str, where: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DarwinLMError(f"{where} is not JSON ({error.msg})", "write one JSON object per line") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a {type(record).__name__}"
        raise DarwinLMError(f"{where} has no '{text_field}' field (it has: {keys or 'nothing'})", TEXT_FIELD_FIX)
    text = record[text_field]
    if not isinstance(text, str):
        raise DarwinLMError(f"{where} field '{text_field}' is a {type(text).__name__}, not a string", TEXT_FIELD_FIX)
    return text


def _read_hf(spec: str, text_field: str) -> list[Document]:
    """Documents of a Hugging Face dataset split; `spec` is `NAME[:CONFIG]:SPLIT` (NAME may hold '/')."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DarwinLMError(
            f"cannot read Hugging Face source 'hf:{spec}'",
            "write it as hf:NAME[:CONFIG]:SPLIT, e.g. hf:wikitext:wikitext-2-raw-v1:train",
        )
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    try:
        import datasets  # lazy: only users with a network and their own data pay for this import
    except ImportError:
        raise DarwinLMError("reading hf: sources needs the `datasets` library", "pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # network, auth, unknown names: all reach the user as one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DarwinLMError(
            f"could not load Hugging Face dataset hf:{spec}: {reason}",
            "check the name, config and split; downloading needs a network and HF_DATASETS_OFFLINE=0",
        ) from error
    if text_field not in dataset.column_names:
        raise DarwinLMError(
            f"hf:{spec} has no '{text_field}' column (it has: {', '.join(dataset.column_names)})", TEXT_FIELD_FIX
        )
    return [Document(f"hf:{spec}:{index}", text) for index, text in enumerate(dataset[text_field])]
