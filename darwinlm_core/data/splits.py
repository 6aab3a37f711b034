"""Splits of a corpus into roles, so that no document serves two.

DarwinLM reads text in three roles: calibration (Hessians for the database, held-out KL for fitness), training
(light finetuning inside selection and after the search) and evaluation (perplexity on held-out text). A document
seen in two roles would make evaluation reward memorisation, so a `CorpusSplit` refuses to exist unless its splits
are disjoint by document id and by text content; its `digest` goes into every manifest built from it.
A user's corpus is split by a seeded hash of each document id (`split_documents`); the default corpus has its
own rule (darwinlm.core.data.default_corpus).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence

from darwinlm.core.data.sources import Document, text_sha256
from darwinlm.core.errors import DarwinLMError


@dataclass(frozen=True)
class CorpusSplit:
    """Calibration, training and named evaluation sets, disjoint by document id and by text content.

    Each evaluation set is named by its text (the default corpus: "sotu", "moby"), and its figures by that name
    (ppl_sotu). `in_domain` names the one set of the calibration text's own domain; every other set is out of
    domain. It may be left out when there is one evaluation set. Lists passed in are stored as tuples, and the
    in-domain set is put first in `evaluation` (the KL to the dense model is taken on the first set's windows).
    Construction fails (DarwinLMError) if a document id or a text appears in two splits, if calibration, training
    or any evaluation set is empty, or if `in_domain` names no evaluation set.
    """

    calibration: tuple[Document, ...]
    training: tuple[Document, ...]
    evaluation: dict[str, tuple[Document, ...]]
    rule: str
    # What each evaluation set is, for tables and reports ("State of the Union 1990+"); not part of the digest.
    labels: dict[str, str] = field(default_factory=dict, compare=False)
    # Which evaluation set is the calibration text's own domain (None: the only one; a name once built). Part
    # of the digest: it decides what a report calls out of domain.
    in_domain: str | None = None
    # sha256 of each document's text, by id: computed once for the disjointness check, reused by `digest`.
    _text_digests: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", tuple(self.calibration))
        object.__setattr__(self, "training", tuple(self.training))
        in_domain = self.in_domain
        if in_domain is None and len(self.evaluation) == 1:
            in_domain = next(iter(self.evaluation))
        if in_domain not in self.evaluation:
            raise DarwinLMError(f"in_domain must name one of the evaluation sets {sorted(self.evaluation)}, not "
                                f"{in_domain!r} ({self.rule})",
                                "pass in_domain: the evaluation set of the calibration text's own domain")
        object.__setattr__(self, "in_domain", in_domain)
        ordered = {in_domain: self.evaluation[in_domain],
                   **{name: docs for name, docs in self.evaluation.items() if name != in_domain}}
        object.__setattr__(self, "evaluation", {name: tuple(docs) for name, docs in ordered.items()})
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

    @property
    def out_of_domain(self) -> tuple[str, ...]:
        """Every evaluation set but the in-domain one, in the split's order."""
        return tuple(name for name in self.evaluation if name != self.in_domain)

    @cached_property
    def digest(self) -> str:
        """sha256 hex over the rule, the in-domain set's name and, per split, every document id with the sha256
        of its text."""
        content = {
            "rule": self.rule,
            "in_domain": self.in_domain,
            "splits": {
                name: [[doc.id, self._text_digests[doc.id]] for doc in docs]
                for name, docs in self.named_splits().items()
            },
        }
        return text_sha256(json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")))

    def describe(self) -> dict:
        """JSON-able summary for manifests: rule, digest, which evaluation set is in domain, per split its size
        and a digest of its ids, and each evaluation set's label."""
        return {
            "rule": self.rule,
            "digest": self.digest,
            "in_domain": self.in_domain,
            "calibration": _describe_documents(self.calibration),
            "training": _describe_documents(self.training),
            "evaluation": {name: _describe_documents(docs) for name, docs in sorted(self.evaluation.items())},
            "labels": {name: self.label(name) for name in sorted(self.evaluation)},
        }

    def label(self, name: str) -> str:
        """What the evaluation set `name` is, in words."""
        return self.labels.get(name, name.replace("_", "-") + " held-out text")


def _describe_documents(documents: Sequence[Document]) -> dict:
    return {
        "documents": len(documents),
        "characters": sum(len(doc.text) for doc in documents),
        "ids_digest": text_sha256("\n".join(doc.id for doc in documents)),
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
            text_digest = text_digests[doc.id] = text_sha256(doc.text)
            other_split, other_id = first_with_text.setdefault(text_digest, (name, doc.id))
            if other_split != name:
                raise DarwinLMError(
                    f"document {doc.id!r} in {name} has the same text as {other_id!r} in {other_split}", fix
                )
    return text_digests


def split_documents(
    documents: Iterable[Document],
    calibration_fraction: float = 0.1,
    evaluation_fraction: float = 0.1,
    seed: int = 0,
    source_name: str | None = None,
) -> CorpusSplit:
    """Split a user's corpus by document: each goes where a seeded hash of its id falls in [0, 1).

    Hashing each id on its own (not shuffling the list) means adding documents never moves the others.
    Identical texts are kept once (the first), so the splits are disjoint by content too. The one evaluation set
    is held out of the same text as calibration, so it is named "in_domain" (its figure: ppl_in_domain) and is
    the split's in-domain set. Raises DarwinLMError if a split comes out empty.
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
    labels = {"in_domain": f"held-out {source_name}" if source_name else "held-out documents"}
    return CorpusSplit(tuple(roles["calibration"]), tuple(roles["training"]),
                       {"in_domain": tuple(roles["evaluation/in_domain"])}, rule, labels, in_domain="in_domain")


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
        text_digest = text_sha256(doc.text)
        if text_digest not in seen:
            seen.add(text_digest)
            unique.append(doc)
    return unique, total - len(unique)


def _unit_hash(seed: int, document_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id) alone, the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}:{document_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
