"""Zero-shot lm-eval tasks built offline from held-out evaluation text (run them with evaluation.lm_eval_run).

Standard zero-shot benchmarks (ARC, HellaSwag, ...) download their data from the Hugging Face hub. Offline, we
build two task kinds per evaluation set of a `CorpusSplit` (text never used for calibration or training):

- `darwinlm_lastword_<set>`: LAMBADA-style cloze. A passage of a few consecutive sentences loses its last word;
  `acc` is whether " word" is the model's greedy continuation, `perplexity` is exp(-mean log p(" word")).
- `darwinlm_nextsent_<set>`: a sentence, then four candidate next sentences: the true one and three drawn from
  other documents of the same set, of about the same length. `acc` (summed log-likelihood) and `acc_norm`
  (per character); chance is 25%.

Each task is a JSONL file plus a YAML config that lm-eval loads with `TaskManager(include_path=DIR)` or
`lm_eval --include_path DIR` (write_task_folder, behind `darwinlm tasks --out DIR`, writes such a folder). Files are written via temp + rename, data before config, so a crash never leaves a
YAML pointing at half-written data. lm_eval is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from darwinlm.core.data.sources import Document
from darwinlm.core.data.splits import CorpusSplit
from darwinlm.core.errors import DarwinLMError

TASK_PREFIX = "darwinlm_"
KINDS = ("lastword", "nextsent")
MANIFEST_NAME = "darwinlm_tasks.json"
N_CHOICES = 4
# Examples written per task unless asked otherwise (fewer when the held-out text holds fewer): at 500, an
# accuracy near 0.5 has a standard error of ±0.022, so a difference of 0.07 between two models is not noise.
EXAMPLES_PER_TASK = 500

# A passage for the cloze: whole sentences of one paragraph, at least this many words (LAMBADA's average is ~75).
PASSAGE_MIN_WORDS, PASSAGE_MAX_WORDS = 40, 200
# Sentences for next-sentence choice: long enough to carry meaning, short enough to keep requests small.
SENTENCE_MIN_WORDS, SENTENCE_MAX_WORDS = 6, 60
# Distractors have the true next sentence's word count, give or take this fraction (at least 2 words).
DISTRACTOR_LENGTH_SLACK = 0.2

# Stage directions in speech transcripts, e.g. "(Applause.)": not the speaker's words.
_STAGE_DIRECTION = re.compile(r"\((?:applause|laughter|laughs|cheers|boos)\b[^()]{0,20}\)", re.IGNORECASE)
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space and something that starts a sentence.
_SENTENCE_END = re.compile(r"([.!?]+[\"”’')\]]*)\s+(?=[\"“‘'(\[]?[A-Z0-9])")
# A "sentence" ending in one of these abbreviations (or an initial) continues in the next piece.
_ABBREVIATION = re.compile(
    r"(?:^|\s|\()(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Col|Lt|Capt|Sen|Rep|Gov|Rev|Prof|No|Mt|vs|etc|U\.S|U\.N|[A-Z])\.$"
)
# The cloze target: a plain word after a space, then the final punctuation (and closing quotes) of the passage.
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s(?P<word>[A-Za-z]+(?:['’][A-Za-z]+)?)[.!?]+[\"”’')\]]*$", re.DOTALL)


# ---------------------------------------------------------------------------------------------------- text


def paragraph_sentences(text: str) -> list[list[str]]:
    """Sentences of each paragraph (paragraphs are separated by blank lines), whitespace collapsed to one space.

    A simple regex splitter: good enough for prose, wrong on rare cases (it keeps text after the last sentence
    end out, and may merge or split around unusual abbreviations).
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        flat = " ".join(_STAGE_DIRECTION.sub(" ", block).split()).replace("——", "—")
        sentences = _split_sentences(flat)
        if sentences:
            paragraphs.append(sentences)
    return paragraphs


def _split_sentences(paragraph: str) -> list[str]:
    pieces = _SENTENCE_END.split(paragraph)  # [text, end, text, end, ..., text]
    raw = [pieces[i] + pieces[i + 1] for i in range(0, len(pieces) - 1, 2)]
    tail = pieces[-1].strip()
    if re.search(r"[.!?][\"”’')\]]*$", tail):
        raw.append(tail)  # text after the last sentence end is kept only if it is itself a sentence
    sentences: list[str] = []
    for piece in raw:
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece.strip())
    return [sentence for sentence in sentences if sentence]


def _passages(paragraphs: list[list[str]]) -> Iterator[str]:
    """Non-overlapping runs of whole sentences within a paragraph, each PASSAGE_MIN..MAX_WORDS words long."""
    for sentences in paragraphs:
        run: list[str] = []
        words = 0
        for sentence in sentences:
            run.append(sentence)
            words += len(sentence.split())
            if words >= PASSAGE_MIN_WORDS:
                if words <= PASSAGE_MAX_WORDS:
                    yield " ".join(run)
                run, words = [], 0


def _fits(sentence: str) -> bool:
    return SENTENCE_MIN_WORDS <= len(sentence.split()) <= SENTENCE_MAX_WORDS


# ---------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class _Pair:
    document: str
    position: str  # "paragraph.sentence" of the first sentence
    first: str
    second: str


def lastword_examples(documents: Sequence[Document], n: int, rng: np.random.Generator) -> list[dict]:
    """Up to n cloze examples {id, document, context, target, text}, drawn at random from all documents."""
    candidates = []
    for doc in documents:
        for index, passage in enumerate(_passages(paragraph_sentences(doc.text))):
            match = _LAST_WORD.match(passage)
            if match:
                candidates.append({"id": f"{doc.id}#{index}", "document": doc.id, "context": match["context"],
                                   "target": " " + match["word"], "text": passage})
    return [candidates[i] for i in _draw(len(candidates), n, rng)]


def nextsent_examples(documents: Sequence[Document], n: int, rng: np.random.Generator) -> list[dict]:
    """Up to n examples {id, document, context, choices, label}: the true next sentence among N_CHOICES, the
    others drawn from other documents of the same set; empty if the set has fewer than two documents."""
    pairs: list[_Pair] = []
    pool: list[tuple[int, str]] = []  # (document index, sentence): where distractors come from
    for doc_index, doc in enumerate(documents):
        for p, sentences in enumerate(paragraph_sentences(doc.text)):
            pool.extend((doc_index, s) for s in sentences if _fits(s))
            pairs.extend(_Pair(doc.id, f"{p}.{s}", first, second)
                         for s, (first, second) in enumerate(zip(sentences, sentences[1:]))
                         if _fits(first) and _fits(second))
    if len({doc_index for doc_index, _ in pool}) < 2:
        return []  # distractors must come from another document
    pool.sort(key=lambda entry: len(entry[1].split()))  # stable: by length, then document order
    pool_lengths = [len(sentence.split()) for _, sentence in pool]
    doc_index_of = {doc.id: index for index, doc in enumerate(documents)}
    examples = []
    for i in rng.permutation(len(pairs)):
        pair = pairs[int(i)]
        distractors = _distractors(pool, pool_lengths, doc_index_of[pair.document], pair.second, rng)
        if distractors is None:
            continue
        label = int(rng.integers(N_CHOICES))
        choices = distractors[:label] + [pair.second] + distractors[label:]
        examples.append({"id": f"{pair.document}#{pair.position}", "document": pair.document,
                         "context": pair.first, "choices": choices, "label": label})
        if len(examples) == n:
            break
    return examples


def _distractors(
    pool: list[tuple[int, str]], lengths: list[int], doc_index: int, truth: str, rng: np.random.Generator
) -> list[str] | None:
    """N_CHOICES - 1 distinct sentences of other documents, none equal to `truth`, of about its length (so that
    summed log-likelihood, lm-eval's `acc`, cannot win by picking the shortest); None if none can be found.

    `pool` is sorted by word count and `lengths` holds those counts.
    """
    words = len(truth.split())
    slack = max(2, round(DISTRACTOR_LENGTH_SLACK * words))
    low, high = bisect.bisect_left(lengths, words - slack), bisect.bisect_right(lengths, words + slack)
    chosen: list[str] = []
    for _ in range(100 if high > low else 0):
        other_doc, sentence = pool[int(rng.integers(low, high))]
        if other_doc != doc_index and sentence != truth and sentence not in chosen:
            chosen.append(sentence)
            if len(chosen) == N_CHOICES - 1:
                return chosen
    return None


def _draw(available: int, n: int, rng: np.random.Generator) -> list[int]:
    """min(n, available) distinct indices in random order (so lm-eval's --limit takes a random subset)."""
    return [int(i) for i in rng.permutation(available)[:n]]


# ---------------------------------------------------------------------------------------------------- files


def task_names(spec: str) -> list[str]:
    """A comma-separated task list (`local,arc_easy`) as names, blanks dropped; `local` stays a placeholder."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def expand_local(names: Sequence[str], local: Sequence[str]) -> list[str]:
    """`names` with the placeholder `local` replaced by the written local tasks, each name once, in order."""
    return list(dict.fromkeys(task for name in names for task in (local if name == "local" else [name])))


def task_name(kind: str, set_name: str) -> str:
    """`darwinlm_<kind>_<set>`, the set name reduced to [a-z0-9_]."""
    return f"{TASK_PREFIX}{kind}_{re.sub(r'[^a-z0-9_]+', '_', set_name.lower()).strip('_')}"


def write_local_tasks(split: CorpusSplit, out_dir, *, examples_per_task: int = EXAMPLES_PER_TASK,
                      seed: int = 0, location=None) -> list[str]:
    """Write darwinlm_lastword_<set> and darwinlm_nextsent_<set> for each evaluation set of `split` into out_dir.

    Per task: `<task>.jsonl` (the examples) and `<task>.yaml` (the lm-eval config, absolute data path), then
    `darwinlm_tasks.json` (split digest, seed, example counts). Same split + seed + examples_per_task → the same
    bytes. A task with no usable examples (text too short, or one document only for nextsent) is skipped and
    listed in the manifest. `location`: the folder the YAMLs name as their data's home, when out_dir will be
    moved there once written (default: out_dir). Returns the task names written, sorted.
    """
    if examples_per_task < 1:
        raise DarwinLMError(f"examples_per_task is {examples_per_task}", "ask for at least 1 example per task")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out if location is None else Path(location).expanduser().resolve()
    builders = {"lastword": lastword_examples, "nextsent": nextsent_examples}
    written, skipped = {}, {}
    for set_name, documents in sorted(split.evaluation.items()):
        for kind in KINDS:
            name = task_name(kind, set_name)
            examples = builders[kind](documents, examples_per_task, _rng(seed, name))
            if not examples:
                skipped[name] = f"no usable examples in evaluation set '{set_name}'"
                continue
            _write_atomic(out / f"{name}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
            _write_atomic(out / f"{name}.yaml", _task_yaml(kind, name, set_name, home, split.digest, seed))
            written[name] = len(examples)
    if not written:
        raise DarwinLMError(
            f"no lm-eval task could be built from the evaluation text ({'; '.join(skipped.values())})",
            f"give evaluation documents with paragraphs of {PASSAGE_MIN_WORDS}+ words of full sentences",
        )
    manifest = {"split_digest": split.digest, "seed": seed, "examples_per_task": examples_per_task,
                "tasks": written, "skipped": skipped}
    _write_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return sorted(written)


def check_task_folder(out_dir) -> Path:
    """out_dir resolved, if write_task_folder may write it: absent, empty, or an earlier task folder (one holding
    darwinlm_tasks.json); else DarwinLMError."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DarwinLMError(f"{out_dir} is a file", "name a new or empty folder for the tasks")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise DarwinLMError(f"{out_dir} holds other files", "name a new or empty folder, or an earlier task "
                            f"folder (one with {MANIFEST_NAME}) to replace")
    return out


def write_task_folder(split: CorpusSplit, out_dir, *, examples_per_task: int = EXAMPLES_PER_TASK,
                      seed: int = 0) -> list[str]:
    """write_local_tasks into a folder of its own, for `lm_eval --include_path out_dir`, written whole: into a
    temporary folder beside it, renamed into place when complete, so out_dir never holds a half-written set
    (nor, replacing an earlier task folder, stale tasks of other text). out_dir must pass check_task_folder.
    Returns the task names written, sorted."""
    out = check_task_folder(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        temporary.chmod(0o777 & ~_UMASK)  # as a plain mkdir would make it, not mkdtemp's 0700
    except OSError as error:
        raise DarwinLMError(f"cannot write into {out.parent}: {error.strerror or error}") from error
    try:
        names = write_local_tasks(split, temporary, examples_per_task=examples_per_task, seed=seed, location=out)
        if out.exists():  # an earlier task folder: set aside, replaced, then deleted
            old = out.with_name(temporary.name.removesuffix(".tmp") + ".old")
            out.rename(old)
            temporary.rename(out)
            shutil.rmtree(old)
        else:
            temporary.rename(out)
    except OSError as error:
        raise DarwinLMError(f"cannot write the tasks into {out}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # gone already once renamed
    return names


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import: what plain open() would apply to a new file


def _rng(seed: int, name: str) -> np.random.Generator:
    # Seeded by (seed, task name): each task's examples do not depend on which other tasks were written.
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")])


def _write_atomic(path: Path, text: str) -> None:
    # The temp name does not end in .yaml/.jsonl, so lm-eval never indexes a half-written file.
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the tasks from other users of the folder
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


_METRICS = {
    "lastword": [("acc", "mean", True), ("perplexity", "perplexity", False)],
    "nextsent": [("acc", "mean", True), ("acc_norm", "mean", True)],
}
_FIELDS = {
    "lastword": {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target"},
    "nextsent": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_target": "label",
                 "doc_to_choice": "choices"},
}


def _task_yaml(kind: str, name: str, set_name: str, out: Path, split_digest: str, seed: int) -> str:
    """The lm-eval config; strings are JSON-quoted, which YAML reads as double-quoted scalars."""
    q = json.dumps
    lines = [
        f"# darwinlm {kind} task on held-out evaluation set {set_name!r} (split {split_digest[:12]}, seed {seed})",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(out / f'{name}.jsonl'))}",
        f"  cache_dir: {q(str(out / '.hf_datasets_cache'))}",  # keeps datasets' arrow copy beside the task
        "test_split: test",
        *(f"{key}: {value}" for key, value in _FIELDS[kind].items()),
        "metric_list:",
        *(line for metric in _METRICS[kind] for line in _metric_yaml(*metric)),
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def _metric_yaml(metric: str, aggregation: str, higher_is_better: bool) -> list[str]:
    return [f"  - metric: {metric}", f"    aggregation: {aggregation}",
            f"    higher_is_better: {str(higher_is_better).lower()}"]


def local_task_names(include_path) -> list[str]:
    """The darwinlm tasks written in include_path (by their YAML files), sorted; [] if there is none."""
    if include_path is None or not Path(include_path).is_dir():
        return []
    return sorted(path.stem for path in Path(include_path).glob(f"{TASK_PREFIX}*.yaml"))
