"""A long bench stopped part-way resumes from its saved rows only when they are what the rerun would measure: the
same arguments, and no change since to the code that measures them."""

import subprocess

import pytest

from bench import results_file

RUN = {"config": {"targets": "0.5", "seeds": [0], "model": "gemma"}}


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A git repository with one commit holding measure.py, and DARWINLM_HOME in tmp_path."""
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    root = tmp_path / "repo"
    root.mkdir()
    (root / "measure.py").write_text("FIGURE = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "measure.py")
    git("commit", "-q", "-m", "measure")
    return root, git("rev-parse", "HEAD")


def save_partial(commit: str | None, run: dict = RUN) -> None:
    origin = {"commit": commit, "date": "2026-11-30"} if commit else None
    results_file.write_partial("long", {"run": run, "origin": origin, "targets": {"0.5": {"dense": {"ppl": 47.2}}}})


def test_rows_of_the_same_run_and_code_are_kept(repository):
    root, commit = repository
    save_partial(commit)
    (root / "notes.txt").write_text("a file the measurement does not read\n")
    earlier = results_file.resumable_partial("long", RUN, ("measure.py",), root)
    assert earlier["targets"]["0.5"]["dense"] == {"ppl": 47.2}
    assert earlier["origin"]["commit"] == commit


@pytest.mark.parametrize("change", ["config", "code", "uncommitted code", "unknown commit", "no provenance"])
def test_rows_measured_otherwise_are_dropped(repository, change, capsys):
    root, commit = repository
    run = {"config": {**RUN["config"], "seeds": [0, 1]}} if change == "config" else RUN
    save_partial({"unknown commit": "0" * 40, "no provenance": None}.get(change, commit))
    if change == "code":
        (root / "measure.py").write_text("FIGURE = 2\n")
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "changed"], cwd=root,
                       check=True)
    elif change == "uncommitted code":
        (root / "measure.py").write_text("FIGURE = 2\n")
    assert results_file.resumable_partial("long", run, ("measure.py",), root) is None
    assert "not resuming" in capsys.readouterr().out


def test_a_partial_from_an_older_bench_is_dropped(repository, capsys):
    root, _ = repository
    results_file.write_partial("long", {"targets": {"0.5": {"dense": {"ppl": 47.2}}}})  # no run, no origin
    assert results_file.resumable_partial("long", RUN, ("measure.py",), root) is None
    assert "recorded no configuration" in capsys.readouterr().out


def test_nothing_to_resume_without_a_partial(repository):
    root, _ = repository
    assert results_file.resumable_partial("long", RUN, ("measure.py",), root) is None
