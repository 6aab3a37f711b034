"""bench.gguf's dense reference: llama.cpp's own converter, taken from the llama-cpp-python sdist once and whole."""

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from bench import gguf


def fake_sdist(folder, version):
    """A tarball shaped like the llama-cpp-python sdist: the converter's parts, and files it must leave behind."""
    path = folder / f"llama_cpp_python-{version}.tar.gz"
    top = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    files = {top + "convert_hf_to_gguf.py": "print('converter')", top + "conversion/__init__.py": "",
             top + "gguf-py/gguf/__init__.py": "", top + "convert_hf_to_gguf_update.py": "",
             top + "src/llama.cpp": "", f"llama_cpp_python-{version}/llama_cpp/__init__.py": "",
             top + "conversion/../../../escaped.py": ""}  # climbs out of the scratch folder: never written
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))


@pytest.fixture
def sdist_downloads(monkeypatch, tmp_path):
    """pip download replaced by a fake sdist; returns the list of download commands run."""
    import llama_cpp

    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the download's scratch folder, inside tmp_path
    calls, real_run = [], subprocess.run

    def run(command, *args, **kwargs):
        if command[1:4] == ["-m", "pip", "download"]:
            calls.append(command)
            fake_sdist(Path(command[-1]), llama_cpp.__version__)
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(gguf.subprocess, "run", run)
    return calls


def test_the_converter_is_the_pinned_sdist_s_and_only_its_parts(sdist_downloads):
    import llama_cpp

    script = gguf.llama_cpp_converter()
    root = script.parent
    assert script.read_text() == "print('converter')" and root.name == llama_cpp.__version__
    assert f"llama-cpp-python=={llama_cpp.__version__}" in sdist_downloads[0]
    kept = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert kept == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
                    "stand_ins/sentencepiece.py"]
    assert not list(root.parents[2].rglob("escaped.py"))  # tmp_path: the data home and the scratch folders
    assert gguf.llama_cpp_converter() == script and len(sdist_downloads) == 1  # kept: downloaded once


def test_the_sentencepiece_stand_in_refuses_a_model_that_needs_sentencepiece(tmp_path):
    (tmp_path / "sentencepiece.py").write_text(gguf.SENTENCEPIECE_STAND_IN)
    run = subprocess.run([sys.executable, "-c", "from sentencepiece import SentencePieceProcessor as S; S()"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0 and "install sentencepiece" in run.stderr
