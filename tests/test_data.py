"""Corpus reading, disjoint splits and token blocks (darwinlm.core.data), on small corpora built in tmp_path."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from darwinlm.core.data import tokens as data_tokens
from darwinlm.core.data.default_corpus import default_split
from darwinlm.core.data.sources import Document, read_documents
from darwinlm.core.data.splits import CorpusSplit, split_documents
from darwinlm.core.data.tokens import sample_blocks, tokenize_blocks
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import default_text_dir
from tests.support.default_text import write_miniature_default_text
from tests.support.tiny_models import TINY_TOKENIZER_CHARS, tiny_tokenizer

CHARS = TINY_TOKENIZER_CHARS
EOS = 1


@pytest.fixture(scope="module")
def char_tokenizer():
    return tiny_tokenizer()


def ids_of(text: str) -> list[int]:
    return [CHARS.index(char) + 2 for char in text]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """A miniature default text: year-prefixed speeches (two in 1953), Moby-Dick chapters, an e-mail, a manual page."""
    speeches = {f"{year}_some_president_x": f"Address of {year}. The state of the Union."
                for year in (1790, 1800, 1944, 1945, 1953, 1989, 1990, 2016)}
    speeches["1953_another_president_y"] = "A second address of 1953."
    return write_miniature_default_text(
        tmp_path, speeches, {chapter: f"CHAPTER {chapter}. Call me Ishmael, again." for chapter in (1, 2, 10)})


def years(documents) -> set[int]:
    return {int(Path(doc.id).name[:4]) for doc in documents}


def assert_disjoint(split: CorpusSplit):
    named = split.named_splits()
    ids = [doc.id for docs in named.values() for doc in docs]
    assert len(ids) == len(set(ids))
    for name, docs in named.items():
        others = {doc.text for other, rest in named.items() if other != name for doc in rest}
        assert not others & {doc.text for doc in docs}


# ------------------------------------------------------------------------------------------------ reading


def test_read_folder_is_recursive_sorted_and_drops_blank(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.txt", "zed")
    write(tmp_path / "blank.txt", "  \n")
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / ".hidden" / "copy.txt", "ignored too")
    assert read_documents(tmp_path) == [Document("a/z.txt", "zed"), Document("b.txt", "bee")]


def test_read_jsonl_ids_and_text_field(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "one"}\n\n{"text": "two", "n": 2}\n')
    assert read_documents(path) == [Document("c.jsonl:1", "one"), Document("c.jsonl:3", "two")]
    other = write(tmp_path / "d.jsonl", '{"body": "x"}\n')
    assert read_documents(str(other), text_field="body") == [Document("d.jsonl:1", "x")]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "nowhere", "no such file or folder"),
        (lambda p: write(p / "only.md", "x").parent, "no .txt files"),
        (lambda p: write(p / "blank.txt", " \n\t").parent, "empty"),
        (lambda p: write(p / "img.txt", b"\x89PNG\x00\x01").parent, "img.txt looks binary"),
        (lambda p: write(p / "latin.txt", "caf\xe9".encode("latin-1")).parent, "latin.txt is not UTF-8"),
        (lambda p: write(p / "c.jsonl", '{"text": "ok"}\n{"text": oops}\n'), "c.jsonl:2 is not JSON"),
        (lambda p: write(p / "c.jsonl", '{"body": "x"}\n'), "c.jsonl:1 has no 'text' field"),
        (lambda p: write(p / "c.jsonl", '{"text": 3}\n'), "c.jsonl:1 field 'text' is a int"),
        (lambda p: write(p / "c.csv", "a,b\n"), "neither a folder"),
        (lambda p: "hf:only-a-name", "hf:NAME[:CONFIG]:SPLIT"),
    ],
)
def test_bad_sources_raise_one_line(tmp_path, make, expected):
    with pytest.raises(DarwinLMError) as excinfo:
        read_documents(make(tmp_path))
    assert expected in one_line_error(excinfo)


def test_missing_text_field_suggests_flag(tmp_path):
    with pytest.raises(DarwinLMError) as excinfo:
        read_documents(write(tmp_path / "c.jsonl", '{"body": "x"}\n'))
    assert "--text-field" in one_line_error(excinfo) and "body" in str(excinfo.value)


def test_hf_source_uses_datasets_lazily(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return ["first", "", "third"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    documents = read_documents("hf:org/set:cfg:train")
    assert calls == [("org/set", "cfg", "train")]
    assert [doc.id for doc in documents] == ["hf:org/set:cfg:train:0", "hf:org/set:cfg:train:2"]
    read_documents("hf:plain:test")
    assert calls[-1] == ("plain", None, "test")
    with pytest.raises(DarwinLMError, match="--text-field"):
        read_documents("hf:plain:test", text_field="body")


# ------------------------------------------------------------------------------------------------ splits


def test_default_split_by_year_and_disjoint(text_dir):
    split = default_split(text_dir)
    assert years(split.training) == {1790, 1800, 1944}
    assert years(split.calibration) == {1945, 1953, 1989} and len(split.calibration) == 4
    assert years(split.evaluation["sotu"]) == {1990, 2016}
    assert [doc.id for doc in split.evaluation["moby"]] == [
        "moby-dick/chapter_1.txt", "moby-dick/chapter_10.txt", "moby-dick/chapter_2.txt"
    ]
    assert [doc.id for doc in split.evaluation["email"]] == ["email/00001.abc.txt"]
    assert [doc.id for doc in split.evaluation["npm_docs"]] == ["npm-docs/commands/npm-install.txt"]
    assert_disjoint(split)
    assert split.describe()["labels"] == {"moby": "Moby-Dick", "sotu": "State of the Union 1990+",
                                          "email": "e-mail (SpamAssassin ham, 2002)", "npm_docs": "npm CLI manual"}


def test_default_split_names_each_evaluation_set_by_its_text_and_says_sotu_is_in_domain(text_dir):
    split = default_split(text_dir)
    # the in-domain set first (the KL is taken on it), then Moby-Dick, the out-of-domain text reported first
    assert list(split.evaluation) == ["sotu", "moby", "email", "npm_docs"]
    assert split.in_domain == "sotu" and split.out_of_domain == ("moby", "email", "npm_docs")
    assert split.describe()["in_domain"] == "sotu"
    assert "in_domain" not in split.rule and "out_of_domain" not in split.rule


def test_default_split_ignores_whole_book_beside_chapters(text_dir):
    write(text_dir / "moby-dick" / "data.txt", "CHAPTER 1. Call me\nIshmael, again.")
    assert "moby-dick/data.txt" not in {doc.id for doc in default_split(text_dir).evaluation["moby"]}


def test_default_split_missing_text_says_setup(tmp_path):
    with pytest.raises(DarwinLMError) as excinfo:
        default_split(tmp_path / "absent")
    assert "make setup" in one_line_error(excinfo) and "--text" in str(excinfo.value)


def test_default_split_of_a_text_folder_from_before_the_e_mail_says_setup(text_dir):
    """A text folder unpacked by an older darwinlm (no e-mail) names what is missing and the fix."""
    shutil.rmtree(text_dir / "email")
    with pytest.raises(DarwinLMError) as excinfo:
        default_split(text_dir)
    assert f"no .txt files in {text_dir / 'email'}" in one_line_error(excinfo) and "make setup" in str(excinfo.value)


def test_default_split_rejects_name_without_year(text_dir):
    write(text_dir / "sotu" / "readme.txt", "not a speech")
    with pytest.raises(DarwinLMError, match="cannot tell the year of sotu/readme.txt"):
        default_split(text_dir)


def test_digest_stable_and_sensitive(text_dir):
    first = default_split(text_dir)
    assert default_split(text_dir).digest == first.digest
    assert len(first.digest) == 64
    description = first.describe()
    json.dumps(description)  # manifests need it JSON-able
    assert description["digest"] == first.digest
    assert description["calibration"]["documents"] == 4
    assert set(description["evaluation"]) == {"sotu", "moby", "email", "npm_docs"}
    write(text_dir / "sotu" / "1945_some_president_x.txt", "Address of 1945, revised.")
    changed = default_split(text_dir)
    assert changed.digest != first.digest
    assert changed.describe()["training"] == description["training"]
    assert changed.describe()["calibration"]["ids_digest"] == description["calibration"]["ids_digest"]


def test_corpus_split_refuses_overlap():
    a, b, c = Document("a", "alpha"), Document("b", "beta"), Document("c", "gamma")
    with pytest.raises(DarwinLMError, match="'a' is in calibration and training"):
        CorpusSplit([a], [a, b], {"in_domain": [c]}, rule="test")
    with pytest.raises(DarwinLMError, match="same text"):
        CorpusSplit([a], [b], {"in_domain": [Document("c", "alpha")]}, rule="test")
    with pytest.raises(DarwinLMError, match="calibration split is empty"):
        CorpusSplit([], [b], {"in_domain": [c]}, rule="test")
    split = CorpusSplit([a], [b], {"in_domain": [c]}, rule="test")
    assert split.calibration == (a,) and split.evaluation == {"in_domain": (c,)}


def test_corpus_split_says_which_evaluation_set_is_in_domain():
    a, b, c, d = (Document(name, f"text {name}") for name in "abcd")
    assert CorpusSplit([a], [b], {"news": [c]}, rule="test").in_domain == "news"  # the only set
    with pytest.raises(DarwinLMError, match="in_domain must name one of the evaluation sets") as excinfo:
        CorpusSplit([a], [b], {"news": [c], "poems": [d]}, rule="test")  # two sets: which is in domain?
    one_line_error(excinfo)
    with pytest.raises(DarwinLMError, match="not 'blogs'"):
        CorpusSplit([a], [b], {"news": [c]}, rule="test", in_domain="blogs")
    split = CorpusSplit([a], [b], {"poems": [d], "news": [c]}, rule="test", in_domain="news")
    assert list(split.evaluation) == ["news", "poems"] and split.out_of_domain == ("poems",)
    # which set is in domain is part of the digest: it decides what a report calls out of domain
    assert CorpusSplit([a], [b], {"poems": [d], "news": [c]}, rule="test", in_domain="poems").digest != split.digest


def corpus(n: int, start: int = 0) -> list[Document]:
    return [Document(f"doc{index}.txt", f"text number {index}") for index in range(start, start + n)]


def test_split_documents_disjoint_deterministic_and_stable():
    documents = corpus(200) + [Document("copy.txt", "text number 7")]
    split = split_documents(documents, seed=3)
    assert_disjoint(split)
    assert "copy.txt" not in {doc.id for docs in split.named_splits().values() for doc in docs}
    assert sum(map(len, split.named_splits().values())) == 200
    assert split_documents(documents, seed=3).digest == split.digest
    assert split_documents(documents, seed=4).digest != split.digest
    # Adding documents leaves every old document where it was.
    grown = split_documents(corpus(300), seed=3)
    for name, docs in split.named_splits().items():
        assert set(docs) <= set(grown.named_splits()[name])


def test_split_documents_too_few_says_how_many():
    with pytest.raises(DarwinLMError) as excinfo:
        split_documents(corpus(3))
    assert "use at least about 30 documents" in one_line_error(excinfo)
    with pytest.raises(DarwinLMError, match="fractions"):
        split_documents(corpus(100), calibration_fraction=0.6, evaluation_fraction=0.5)


# ------------------------------------------------------------------------------------------------ blocks


def test_blocks_shape_and_eos_joins(char_tokenizer):
    documents = [Document("a", "abc"), Document("b", "de"), Document("c", "fghij")]
    blocks = tokenize_blocks(documents, char_tokenizer, seq_len=4)
    stream = ids_of("abc") + [EOS] + ids_of("de") + [EOS] + ids_of("fghij")  # 12 tokens: 3 full blocks
    assert blocks.dtype == torch.int64 and blocks.shape == (3, 4)
    assert blocks.flatten().tolist() == stream
    assert tokenize_blocks(documents, char_tokenizer, seq_len=5).flatten().tolist() == stream[:10]
    assert tokenize_blocks(documents, char_tokenizer, seq_len=4, max_blocks=2).tolist() == [stream[:4], stream[4:8]]


def test_blocks_of_long_document_cut_into_pieces_match_whole(char_tokenizer, monkeypatch):
    text = "Call me Ishmael.\n\n  Some years ago, never mind how long.\nprecisely " * 40
    documents = [Document("a", text), Document("b", "tail")]
    whole = tokenize_blocks(documents, char_tokenizer, seq_len=16)
    monkeypatch.setattr(data_tokens, "TOKENIZE_CHUNK_CHARS", 50)
    assert torch.equal(tokenize_blocks(documents, char_tokenizer, seq_len=16), whole)


def test_blocks_accept_a_plain_tokenizer_object():
    class Ords:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False, **kwargs):
            return {"input_ids": [[ord(char) for char in text] for text in texts]}

    blocks = tokenize_blocks([Document("a", "xy"), Document("b", "z")], Ords(), seq_len=2)
    assert blocks.tolist() == [[ord("x"), ord("y")], [0, ord("z")]]


def test_too_little_text_names_token_counts(char_tokenizer):
    with pytest.raises(DarwinLMError) as excinfo:
        tokenize_blocks([Document("a", "abc"), Document("b", "d")], char_tokenizer, seq_len=512)
    assert "gives 5 tokens" in one_line_error(excinfo) and "512" in str(excinfo.value)


def test_sample_blocks_distinct_and_seeded():
    blocks = torch.arange(40).view(10, 4)
    first = sample_blocks(blocks, 6, torch.Generator().manual_seed(0))
    assert first.shape == (6, 4)
    assert len({row[0].item() for row in first}) == 6
    assert torch.equal(sample_blocks(blocks, 6, torch.Generator().manual_seed(0)), first)
    with pytest.raises(DarwinLMError, match="asked for 11 blocks but 10 are available"):
        sample_blocks(blocks, 11, torch.Generator())


# ------------------------------------------------------------------------------------------------ real text


@pytest.mark.skipif(not (default_text_dir() / "sotu").is_dir(), reason="default text not set up (make setup)")
def test_real_default_split():
    split = default_split()
    assert min(years(split.training)) == 1790 and max(years(split.training)) == 1944
    assert min(years(split.calibration)) == 1945 and max(years(split.calibration)) == 1989
    assert min(years(split.evaluation["sotu"])) == 1990
    assert len(split.evaluation["moby"]) > 100
    assert len(split.evaluation["email"]) == 2500 and len(split.evaluation["npm_docs"]) > 50
    assert not any(doc.text.startswith(("From ", "Return-Path:")) for doc in split.evaluation["email"])
    assert_disjoint(split)


def test_load_split_of_the_users_text_is_labelled_by_its_name(tmp_path):
    from darwinlm.core.data.default_corpus import load_split

    corpus = tmp_path / "speeches"
    corpus.mkdir()
    for index in range(40):
        write(corpus / f"s{index}.txt", f"speech number {index} about the harbor and the budget")
    split = load_split(str(corpus))
    assert split.describe()["labels"] == {"in_domain": "held-out speeches"}
    # a user's own text has one held-out set, of its own domain: named in_domain, and in domain
    assert list(split.evaluation) == ["in_domain"] and split.in_domain == "in_domain"
    assert split.out_of_domain == () and split.describe()["in_domain"] == "in_domain"
    assert split.digest == split_documents(read_documents(corpus)).digest  # the label is not part of the digest
