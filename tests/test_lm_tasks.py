"""Local lm-eval tasks: deterministic files, sound examples from evaluation text only, runnable in memory and by
the `lm_eval` command on a pruned export."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darwinlm.core.evaluation import task_files as lm_tasks
from darwinlm.core.data.sources import Document
from darwinlm.core.data.splits import CorpusSplit
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.export.huggingface import export_model
from darwinlm.core.evaluation.lm_eval_run import run_lm_eval
from darwinlm.core.evaluation.task_files import local_task_names, write_local_tasks
from tests.support.prose import synthetic_document
from tests.support.tiny_models import pruned_tiny, tiny_model, tiny_tokenizer

def synthetic_split(seed: int = 0) -> CorpusSplit:
    rng = random.Random(seed)
    docs = [synthetic_document(rng, index) for index in range(22)]
    return CorpusSplit(calibration=docs[:5], training=docs[5:10],
                       evaluation={"sotu": docs[10:16], "moby": docs[16:]}, rule="synthetic test split",
                       in_domain="sotu")


@pytest.fixture(scope="module")
def split() -> CorpusSplit:
    return synthetic_split()


@pytest.fixture(scope="module")
def task_dir(split, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    write_local_tasks(split, folder, examples_per_task=20)
    return folder


def read_examples(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def flat(text: str) -> str:
    return " ".join(text.split())


ALL_TASKS = ["darwinlm_lastword_moby", "darwinlm_lastword_sotu", "darwinlm_nextsent_moby", "darwinlm_nextsent_sotu"]


def test_tasks_are_written_deterministically(split, tmp_path):
    names = write_local_tasks(split, tmp_path / "a", examples_per_task=20, seed=3)
    assert names == ALL_TASKS == local_task_names(tmp_path / "a")
    first = {path.name: path.read_bytes() for path in (tmp_path / "a").glob("darwinlm*")}
    write_local_tasks(split, tmp_path / "a", examples_per_task=20, seed=3)  # rewrite in place: same bytes
    assert first == {path.name: path.read_bytes() for path in (tmp_path / "a").glob("darwinlm*")}
    write_local_tasks(synthetic_split(), tmp_path / "b", examples_per_task=20, seed=3)  # rebuilt split, other dir
    for name, data in first.items():
        other = (tmp_path / "b" / name).read_text()
        assert data.decode() == other.replace(str(tmp_path / "b"), str(tmp_path / "a")), name
    write_local_tasks(split, tmp_path / "c", examples_per_task=20, seed=4)
    assert (tmp_path / "c" / f"{ALL_TASKS[2]}.jsonl").read_bytes() != first[f"{ALL_TASKS[2]}.jsonl"]
    assert not list(tmp_path.rglob("*.tmp"))
    manifest = json.loads((tmp_path / "a" / "darwinlm_tasks.json").read_text())
    assert manifest["split_digest"] == split.digest and manifest["tasks"] == dict.fromkeys(ALL_TASKS, 20)


def test_next_sentence_choices_hold_the_truth_once(split, task_dir):
    for set_name in ("sotu", "moby"):
        documents = {doc.id: flat(doc.text) for doc in split.evaluation[set_name]}
        examples = read_examples(task_dir, f"darwinlm_nextsent_{set_name}")
        assert len(examples) == 20
        for example in examples:
            choices, label, own = example["choices"], example["label"], documents[example["document"]]
            assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= label < 4
            truth = choices[label]
            assert f"{example['context']} {truth}" in own  # the label points at the sentence that follows
            # Exactly one choice follows the context in its document; the others come from other documents.
            assert [f"{example['context']} {choice}" in own for choice in choices].count(True) == 1
            slack = max(2, round(lm_tasks.DISTRACTOR_LENGTH_SLACK * len(truth.split())))
            for index, choice in enumerate(choices):
                assert abs(len(choice.split()) - len(truth.split())) <= slack  # length is no give-away
                if index != label:
                    assert choice not in own
                    assert any(choice in text for doc_id, text in documents.items() if doc_id != example["document"])
        assert len({example["label"] for example in examples}) >= 3  # labels are shuffled, not all in one place


def test_task_text_comes_only_from_evaluation_documents(split, task_dir):
    seen_in_other_roles = [flat(doc.text) for doc in split.calibration + split.training]
    for set_name, documents in split.evaluation.items():
        texts = {doc.id: flat(doc.text) for doc in documents}
        for example in read_examples(task_dir, f"darwinlm_lastword_{set_name}"):
            assert example["target"].startswith(" ") and example["target"].strip().isalpha()
            assert example["text"].startswith(example["context"] + example["target"])
            assert example["text"] in texts[example["document"]]
            assert not any(example["text"] in other for other in seen_in_other_roles)
        for example in read_examples(task_dir, f"darwinlm_nextsent_{set_name}"):
            assert example["document"] in texts
            for sentence in [example["context"], *example["choices"]]:
                assert any(sentence in text for text in texts.values())
                assert not any(sentence in other for other in seen_in_other_roles)


def test_a_set_too_small_for_a_task_is_skipped_and_no_text_at_all_is_an_error(split, tmp_path):
    one_document = CorpusSplit(split.calibration, split.training, {"sotu": split.evaluation["sotu"][:1]},
                               rule="one evaluation document")
    assert write_local_tasks(one_document, tmp_path / "one") == ["darwinlm_lastword_sotu"]
    manifest = json.loads((tmp_path / "one" / "darwinlm_tasks.json").read_text())
    assert "darwinlm_nextsent_sotu" in manifest["skipped"]
    too_short = CorpusSplit(split.calibration, split.training, {"in_domain": [Document("x", "Too short.")]},
                            rule="too short")
    with pytest.raises(DarwinLMError, match="no lm-eval task could be built"):
        write_local_tasks(too_short, tmp_path / "short")


def test_a_crash_while_writing_leaves_no_config_without_its_data(split, tmp_path, monkeypatch):
    calls = []

    def replace_then_crash(source, target):
        calls.append(target)
        if len(calls) == 4:  # the data of the second task is in place, its config not yet
            raise OSError("disk full")
        os.rename(source, target)

    monkeypatch.setattr(lm_tasks.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_local_tasks(split, tmp_path, examples_per_task=5)
    assert local_task_names(tmp_path) == ["darwinlm_lastword_moby"]  # sets are written in name order
    assert (tmp_path / "darwinlm_lastword_moby.jsonl").is_file()
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "darwinlm_tasks.json").exists()


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | context), whether greedy decoding gives them), computed here
    independently of lm-eval; the tiny tokenizer has one token per character, so the split is exact."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    # as lm-eval does: the last max_length + 1 tokens, the final one only as a target (context cut on the left)
    window = (context_ids + continuation_ids)[-(model.config.max_position_embeddings + 1):][:-1]
    logits = model(torch.tensor([window])).logits[0, -len(continuation_ids):]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(continuation_ids)
    return float(logprobs[torch.arange(len(target)), target].sum()), bool((logprobs.argmax(-1) == target).all())


def test_run_lm_eval_in_memory_on_a_tiny_model(task_dir):
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    results = run_lm_eval(model, tokenizer, ALL_TASKS, include_path=str(task_dir), batch_size=8, limit=6)
    assert sorted(results) == ALL_TASKS
    for name, metrics in results.items():
        assert metrics["examples"] == 6 and not any("," in key or "stderr" in key for key in metrics)
        for metric in ("acc", "acc_norm"):  # binomial standard errors beside the accuracies
            if metric in metrics:
                assert metrics[f"{metric}_se"] == pytest.approx(math.sqrt(metrics[metric] * (1 - metrics[metric]) / 6))
        examples = read_examples(task_dir, name)[:6]
        if "lastword" in name:  # acc: the target word is the greedy continuation; perplexity over its tokens
            scored = [continuation_logprob(model, tokenizer, e["context"], e["target"]) for e in examples]
            assert metrics["acc"] == pytest.approx(sum(greedy for _, greedy in scored) / 6)
            assert metrics["perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in scored) / 6), rel=1e-3)
        else:  # acc: the true next sentence has the highest summed log-likelihood; acc_norm, per character
            picks, picks_norm = [], []
            for example in examples:
                scores = [continuation_logprob(model, tokenizer, example["context"], " " + c)[0]
                          for c in example["choices"]]
                picks.append(max(range(4), key=scores.__getitem__) == example["label"])
                normalised = [score / len(c) for score, c in zip(scores, example["choices"])]
                picks_norm.append(max(range(4), key=normalised.__getitem__) == example["label"])
            assert metrics["acc"] == pytest.approx(sum(picks) / 6)
            assert metrics["acc_norm"] == pytest.approx(sum(picks_norm) / 6)


def test_unknown_task_is_one_clear_line(task_dir):
    with pytest.raises(DarwinLMError) as error:
        run_lm_eval(tiny_model("llama"), tiny_tokenizer(), ["darwinlm_nope_sotu"], include_path=str(task_dir))
    message = str(error.value)
    assert "\n" not in message and "darwinlm_nope_sotu" in message
    assert all(name in message for name in ALL_TASKS) and "network" in message


def test_lm_eval_command_runs_on_a_pruned_export_with_tasks_from_the_tasks_command(tmp_path, capsys):
    from darwinlm.flows.cli import main

    rng, text = random.Random(0), tmp_path / "text"
    text.mkdir()
    for index in range(40):  # a folder of .txt documents, split by document as a user's text is
        document = synthetic_document(rng, index)
        (text / document.id).write_text(document.text)
    task_dir = tmp_path / "tasks"
    assert main(["tasks", "--out", str(task_dir), "--text", str(text), "--examples", "10"]) == 0
    assert "lm_eval --model hf" in capsys.readouterr().out
    model, _, _, _ = pruned_tiny("llama", tmp_path)
    export_model(model, tiny_tokenizer(), str(tmp_path / "pruned"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={tmp_path / 'pruned'},trust_remote_code=True,dtype=float32",
               "--tasks", "darwinlm_lastword_in_domain", "--include_path", str(task_dir),
               "--limit", "5", "--device", "cpu", "--batch_size", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "darwinlm_lastword_in_domain" in result.stdout and "acc" in result.stdout


def test_task_lists_expand_local_once_in_order():
    from darwinlm.core.evaluation.task_files import expand_local, task_names

    names = task_names(" local, arc_easy,,local ")
    assert names == ["local", "arc_easy", "local"]
    assert expand_local(names, ["darwinlm_a", "darwinlm_b"]) == ["darwinlm_a", "darwinlm_b", "arc_easy"]


def test_zero_shot_scores_carry_standard_errors(split):
    from darwinlm.core.evaluation.held_out import zero_shot_scores

    scores = zero_shot_scores(tiny_model("llama").eval(), tiny_tokenizer(), split, "local", 5)
    accuracies = {key: value for key, value in scores.items() if key.startswith("acc_") and not key.endswith("_se")}
    assert sorted(accuracies) == [f"acc_{name}" for name in ALL_TASKS]
    for key, acc in accuracies.items():
        assert scores[f"{key}_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / 5))
    assert scores["zeroshot_acc"] == pytest.approx(sum(accuracies.values()) / 4)
    assert scores["zeroshot_acc_se"] == pytest.approx(math.sqrt(sum(scores[f"{k}_se"] ** 2 for k in accuracies)) / 4)
