"""Held-out windows (darwinlm.core.data.windows): spread over the whole held-out text, split into validation and
test windows deterministically, and the compression's reported evaluation reads the test windows."""

import json

import pytest
import torch

from darwinlm.core.config import load_preset
from darwinlm.core.data.sources import Document
from darwinlm.core.data.windows import (EVAL_SPLITS, WINDOWS_PROTOCOL, check_eval_split, held_out_windows,
                                        spread_starts, windows_of_stream)
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.metrics import perplexity_with_se
from darwinlm.core.data.prepared import prepare_data
from darwinlm.core.evaluation.held_out import evaluate, evaluate_dense
from tests.support import crash_campaign as campaign
from tests.support.tiny_models import tiny_model, tiny_tokenizer

SEQ_LEN = 16


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def covered(starts, seq_len: int = SEQ_LEN) -> set[int]:
    return {token for start in starts for token in range(start, start + seq_len)}


def test_windows_spread_over_the_whole_stream_not_its_first_tokens():
    stream = torch.arange(10_000)
    windows = windows_of_stream(stream, SEQ_LEN, per_split=5)
    every = sorted(windows.starts["validation"] + windows.starts["test"])
    assert every[0] == 0 and every[-1] + SEQ_LEN == 10_000  # from the first token to the last
    assert all(b - a >= SEQ_LEN for a, b in zip(every, every[1:]))  # no overlap
    gaps = [b - a for a, b in zip(every, every[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    for split in EVAL_SPLITS:
        starts = windows.starts[split]
        assert len(starts) == 5
        assert windows.describe(split)["spread_over_tokens"] > 0.85 * 10_000  # each split spans the text
        assert torch.equal(windows.of(split), torch.stack([stream[s : s + SEQ_LEN] for s in starts]))
    assert windows.starts["test"][-1] > 4 * 2 * 5 * SEQ_LEN  # far past the first contiguous windows


def test_validation_and_test_are_disjoint_and_interleaved():
    windows = windows_of_stream(torch.arange(5_000), SEQ_LEN, per_split=7)
    validation, test = windows.starts["validation"], windows.starts["test"]
    assert not covered(validation) & covered(test)  # no token is in both
    merged = sorted([(start, "validation") for start in validation] + [(start, "test") for start in test])
    assert [split for _, split in merged] == ["validation", "test"] * 7  # alternating over the whole text


def test_short_text_uses_every_window_that_fits_and_needs_two():
    windows = windows_of_stream(torch.arange(5 * SEQ_LEN + 3), SEQ_LEN, per_split=40)
    assert (len(windows.starts["validation"]), len(windows.starts["test"])) == (3, 2)
    with pytest.raises(DarwinLMError) as excinfo:
        windows_of_stream(torch.arange(2 * SEQ_LEN - 1), SEQ_LEN, per_split=4)
    assert "a validation and a test window" in one_line_error(excinfo)
    with pytest.raises(DarwinLMError):
        spread_starts(100, SEQ_LEN, 7)  # 7 windows of 16 do not fit in 100 tokens


def test_the_split_is_deterministic_from_the_text():
    documents = [Document(f"doc{i}", f"Speech number {i}. " + "The union is strong and the people work. " * 20)
                 for i in range(12)]
    first = held_out_windows(documents, tiny_tokenizer(), SEQ_LEN, per_split=6)
    again = held_out_windows(list(documents), tiny_tokenizer(), SEQ_LEN, per_split=6)
    assert first.record() == again.record()
    for split in EVAL_SPLITS:
        assert torch.equal(first.of(split), again.of(split))
    assert first.record()["stream_tokens"] > 12 * 20 * 40  # the whole text was read, not just enough of it


@pytest.mark.parametrize("bad", ["dev", "Test", "", "train"])
def test_a_bad_split_name_is_one_clear_line(bad):
    with pytest.raises(DarwinLMError) as excinfo:
        check_eval_split(bad)
    message = one_line_error(excinfo)
    assert repr(bad) in message and "validation" in message and "test" in message
    windows = windows_of_stream(torch.arange(1_000), SEQ_LEN, per_split=2)
    with pytest.raises(DarwinLMError):
        windows.of(bad)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny checkpoint and corpus the flow tests compress, and the tiny preset pointed at them."""
    root = campaign.make_workspace(tmp_path_factory.mktemp("eval-windows"))
    config = load_preset("tiny", {"model": str(root / "model"), "data": {"text": str(root / "corpus")},
                                  "device": "cpu"})
    return root, config


def test_prepared_data_splits_every_evaluation_set_and_evaluate_reads_the_split_it_is_told(workspace):
    _, config = workspace
    model = tiny_model("llama")
    data = prepare_data(config.data, tiny_tokenizer())
    record = data.windows_record()
    assert set(record["sets"]) == set(data.split.evaluation)
    for name, windows in record["sets"].items():
        assert len(windows["test"]) == config.data.eval_windows
        assert not covered(windows["validation"], config.data.seq_len) & covered(windows["test"], config.data.seq_len)
    reported, chosen_on = evaluate(model, data, None), evaluate(model, data, None, split="validation")
    assert reported["windows"]["split"] == "test" and chosen_on["windows"]["split"] == "validation"
    for name, ids in data.eval_windows("test").items():
        assert reported[f"ppl_{name}"] == perplexity_with_se(model, ids)[0]
        assert reported[f"ppl_{name}"] != chosen_on[f"ppl_{name}"]
        assert reported["windows"]["sets"][name]["count"] == ids.shape[0]
    with pytest.raises(DarwinLMError) as excinfo:
        evaluate(model, data, None, split="dev")
    one_line_error(excinfo)


def test_the_compressions_reported_evaluation_reads_the_test_windows(workspace, tmp_path, monkeypatch):
    """evaluate_task: the dense-vs-pruned table is on the test windows, says so, and the run's data record keeps
    the validation/test split; the dense evaluation's content address names the windows protocol."""
    from darwinlm.tasks import stages
    from darwinlm.tasks.refs import ModelRef

    root, config = workspace
    values = config.to_dict()
    store = tmp_path / "store"

    def evaluation(run: str) -> dict:
        run_uri = str(tmp_path / run)
        data_ref = stages.prepare_data_task.fn(values, run_uri, str(store))
        assert data_ref.eval_windows["protocol"] == WINDOWS_PROTOCOL
        return stages.evaluate_task.fn(values, run_uri, ModelRef(uri=str(root / "model")))

    results = evaluation("run")
    data = prepare_data(config.data, tiny_tokenizer())
    model = tiny_model("llama")  # the workspace's checkpoint: dense and "pruned" are both it here
    assert results["windows"] == data.windows_used("test")
    assert "windows" not in results["dense"] and "windows" not in results["pruned"]  # rows hold figures only
    for name, ids in data.eval_windows("test").items():
        expected = perplexity_with_se(model, ids)[0]
        assert results["pruned"][f"ppl_{name}"] == pytest.approx(expected, rel=1e-5)
        assert results["dense"][f"ppl_{name}"] == pytest.approx(expected, rel=1e-5)
    stored = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert stored["windows"]["split"] == "test"
    assert "Perplexities and KL on the test windows" in (root / "model" / "README.md").read_text()

    addresses = set((store / "dense-evaluations").iterdir())
    calls = []

    def counted_dense_evaluation(*args, **kwargs):
        calls.append(kwargs.get("split"))
        return evaluate_dense(*args, **kwargs)

    monkeypatch.setattr(stages, "WINDOWS_PROTOCOL", "first-contiguous")  # as if measured under another rule
    monkeypatch.setattr(stages, "evaluate_dense", counted_dense_evaluation)
    evaluation("other-run")
    assert calls == ["test"]  # computed again, not read from the first run's stored row
    assert len(set((store / "dense-evaluations").iterdir()) - addresses) == 1


def test_the_printed_table_and_results_file_say_which_windows_they_read(capsys, tmp_path):
    from darwinlm.flows.report import print_summary, write_results

    windows = {"split": "test", "protocol": WINDOWS_PROTOCOL,
               "sets": {"sotu": {"count": 40, "spread_over_tokens": 250_000, "stream_tokens": 260_000}}}
    rows = {"dense": {"params": 10, "ppl_sotu": 9.0}, "pruned": {"params": 6, "ppl_sotu": 11.0}}
    validation = {"ppl_sotu": 10.5, "ppl_moby": 30.0, "windows": {**windows, "split": "validation"}}
    summary = {"evaluation": {**rows, "windows": windows, "validation": validation}, "kept_params": 6,
               "dense_params": 10, "wall_s": 1.0, "model_uri": "/m", "mlflow_run_id": "r", "registered_model": "x",
               "registered_version": "1"}
    print_summary(summary)
    assert "test windows (sotu 40 spread over 250,000 of 260,000 tokens)" in capsys.readouterr().out
    write_results(summary, str(tmp_path / "demo.json"))
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written["windows"] == windows and written["validation"] == validation  # the figures to choose on
