"""Fast checks of default-asset preparation: no network, no model conversion."""

import io
import tarfile
from pathlib import Path

import pytest

from darwinlm.flows import default_assets
from darwinlm.flows.default_assets import (MANIFEST, extract_text_files, prepare_default_model,
                                          prepare_default_text)
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


def test_prepared_assets_return_without_work(home, monkeypatch):
    for folder in (default_model_dir(), default_text_dir()):
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text("{}")

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

    def fake_pack(specs, dest):
        return {spec: _tarball(dest / f"{i}.tgz", {f"package/data/doc_{i}.txt": b"text"})
                for i, spec in enumerate(specs)}

    monkeypatch.setattr(default_assets, "_npm_pack", fake_pack)
    text = prepare_default_text()
    assert (text / MANIFEST).exists()
    assert sorted(p.name for p in (text / "sotu").iterdir()) == ["doc_0.txt"]
    assert sorted(p.name for p in (text / "moby-dick").iterdir()) == ["doc_1.txt"]
    assert not list(text.glob("*.tgz"))
    assert [p.name for p in home.iterdir()] == ["text"]  # no temporary folder left behind
