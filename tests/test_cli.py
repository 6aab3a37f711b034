"""`darwinlm evaluate`: figures on a tiny saved model, and one clear error line for each kind of bad input."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from tests.support.tiny_models import tiny_model, tiny_tokenizer
from darwinlm.flows.cli import main

SOTU_LIKE = "The state of the union is strong, said the president to the congress. " * 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(40):
        (folder / f"doc_{index:02d}.txt").write_text(f"Document {index}. {SOTU_LIKE}")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_prints_perplexity_json(capsys, model_dir, corpus):
    code, out, _ = run_cli(capsys, "evaluate", "--model", str(model_dir), "--text", str(corpus),
                           "--seq-len", "32", "--windows", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert list(result["results"]) == ["in_domain"] and result["in_domain"] == "in_domain"  # a user's text: one set
    in_domain = result["results"]["in_domain"]
    assert in_domain["windows"] == 3 and in_domain["tokens"] == 96
    assert 1.0 < in_domain["perplexity"] < 1000  # random tiny model over a 99-token vocabulary
    assert 0.0 < in_domain["perplexity_se"] < in_domain["perplexity"]  # over the 3 windows


def test_evaluate_table_shows_perplexity_with_its_standard_error(capsys, model_dir, corpus):
    code, out, _ = run_cli(capsys, "evaluate", "--model", str(model_dir), "--text", str(corpus),
                           "--seq-len", "32", "--windows", "3")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("in_domain"))
    assert row.split()[1] == "3" and row.split()[3] == "±"
    assert row.endswith("in (held-out corpus)")


def expect_one_line_error(capsys, *argv, match: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    # Progress bars of earlier work may precede it; the error itself is exactly one line, and the last.
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("darwinlm: error: ") and err.strip().endswith(errors[0]), err
    assert match in errors[0], errors[0]
    return errors[0]


def test_missing_model_folder(capsys, corpus, tmp_path):
    expect_one_line_error(capsys, "evaluate", "--model", str(tmp_path / "nope"), "--text", str(corpus),
                          match="does not exist")


def test_folder_without_config(capsys, corpus, tmp_path):
    expect_one_line_error(capsys, "evaluate", "--model", str(tmp_path), "--text", str(corpus), match="no config.json")


def test_unsupported_architecture(capsys, corpus, tmp_path):
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    expect_one_line_error(capsys, "evaluate", "--model", str(tmp_path / "gpt2"), "--text", str(corpus),
                          match="unsupported architecture 'gpt2'")


def test_empty_corpus(capsys, model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    expect_one_line_error(capsys, "evaluate", "--model", str(model_dir), "--text", str(tmp_path / "empty"),
                          match="empty")


def test_binary_file(capsys, model_dir, corpus):
    (corpus / "weights.txt").write_bytes(b"\x00\x01\x02binary\xff" * 10)
    line = expect_one_line_error(capsys, "evaluate", "--model", str(model_dir), "--text", str(corpus),
                                 match="weights.txt")
    assert "binary" in line or "UTF-8" in line


def test_tokenizer_larger_than_model_vocabulary(capsys, corpus, tmp_path):
    folder = tmp_path / "mismatch"
    tiny_model("llama", vocab_size=64).save_pretrained(folder)  # the tiny tokenizer has 99 tokens
    tiny_tokenizer().save_pretrained(folder)
    expect_one_line_error(capsys, "evaluate", "--model", str(folder), "--text", str(corpus), match="tokenizer")


def test_process_exit_codes(tmp_path):
    """The console entry point really exits non-zero: 1 for a DarwinLMError, 2 for a usage error."""
    bad_input = subprocess.run([sys.executable, "-m", "darwinlm.flows.cli", "evaluate", "--model", str(tmp_path / "nope"),
                                "--text", str(tmp_path)], capture_output=True, text=True)
    assert bad_input.returncode == 1 and len(bad_input.stderr.strip().splitlines()) == 1
    usage = subprocess.run([sys.executable, "-m", "darwinlm.flows.cli", "evaluate", "--bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> Path:
    """A folder of varied prose: next-sentence choice needs distinct sentences."""
    from tests.support.prose import synthetic_document

    folder, rng = tmp_path_factory.mktemp("prose"), random.Random(0)
    for index in range(40):
        document = synthetic_document(rng, index)
        (folder / document.id).write_text(document.text)
    return folder


def test_evaluate_runs_local_lm_eval_tasks(capsys, model_dir, prose):
    code, out, err = run_cli(capsys, "evaluate", "--model", str(model_dir), "--text", str(prose),
                             "--seq-len", "32", "--windows", "2", "--tasks", "local", "--task-limit", "5", "--json")
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["results"]["in_domain"]["windows"] == 2  # perplexity is still reported
    tasks = result["tasks"]
    assert sorted(tasks) == ["darwinlm_lastword_in_domain", "darwinlm_nextsent_in_domain"]
    for metrics in tasks.values():
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["examples"] == 5
        assert metrics["acc_se"] == pytest.approx((metrics["acc"] * (1 - metrics["acc"]) / 5) ** 0.5)
    assert 0.0 <= tasks["darwinlm_nextsent_in_domain"]["acc_norm"] <= 1.0


def test_tasks_command_writes_a_folder_that_lm_eval_loads(capsys, prose, tmp_path):
    from lm_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    code, printed, err = run_cli(capsys, "tasks", "--out", str(out), "--text", str(prose), "--examples", "20")
    assert code == 0, err
    names = ["darwinlm_lastword_in_domain", "darwinlm_nextsent_in_domain"]
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("lm_eval "))
    assert f"--include_path {out}" in command and f"--tasks {','.join(names)}" in command
    assert set(names) <= set(TaskManager(include_path=str(out), include_defaults=False).all_tasks)
    for name in names:  # the configs name their data where it now lies, not in the temporary folder
        assert f'"{out / name}.jsonl"' in (out / f"{name}.yaml").read_text()
        assert 0 < len((out / f"{name}.jsonl").read_text().splitlines()) <= 20
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tasks"]  # no temporary folder left behind

    code, _, _ = run_cli(capsys, "tasks", "--out", str(out), "--text", str(prose), "--examples", "3")
    assert code == 0 and json.loads((out / "darwinlm_tasks.json").read_text())["examples_per_task"] == 3
    assert all(len((out / f"{name}.jsonl").read_text().splitlines()) == 3 for name in names)  # replaced
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tasks"]


def test_tasks_command_refuses_bad_input_and_writes_nothing(capsys, prose, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    expect_one_line_error(capsys, "tasks", "--out", str(tmp_path / "new"), "--text", str(prose), "--examples", "0",
                          match="--examples is 0")
    expect_one_line_error(capsys, "tasks", "--out", str(tmp_path / "a_file"), "--text", str(prose), match="is a file")
    expect_one_line_error(capsys, "tasks", "--out", str(tmp_path / "mine"), "--text", str(prose),
                          match="holds other files")
    expect_one_line_error(capsys, "tasks", "--out", str(tmp_path / "new"), "--text", str(tmp_path / "nope"),
                          match="nope")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "mine"]
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]
