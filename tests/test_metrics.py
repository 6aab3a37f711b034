"""Held-out perplexity with its standard error, accuracy standard errors, and the within-noise test."""

import math

import pytest
import torch
import torch.nn.functional as F

from darwinlm.core.evaluation.lm_eval_run import clean_results
from darwinlm.core.evaluation.metrics import (binomial_se, mean_se, perplexity, perplexity_with_se, standard_error,
                                              with_se, within_noise)
from darwinlm.core.data.windows import windows_of_stream
from darwinlm.core.data.prepared import PreparedData
from darwinlm.core.evaluation.held_out import evaluate
from tests.support.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


def windows(rows: int, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 90, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def held_out_data(**per_split: int) -> PreparedData:
    """Data whose evaluation set `name` holds `per_split[name]` validation and as many test windows of 16
    tokens; evaluate reads only the windows."""
    empty = torch.zeros(0, 16, dtype=torch.long)
    held_out = {name: windows_of_stream(windows(2 * count, seed=index + 1).flatten(), 16, count)
                for index, (name, count) in enumerate(per_split.items())}
    return PreparedData(split=None, calibration_ids=empty, teacher_pool_ids=empty, train_ids=empty,
                        post_train_ids=empty, held_out=held_out)


def test_perplexity_se_is_the_spread_of_window_means_through_the_delta_method(model):
    ids = windows(6)
    with torch.no_grad():  # computed here independently: token NLLs of each window, one window at a time
        per_window = [F.cross_entropy(model(row[None]).logits[0, :-1].double(), row[1:]).item() for row in ids]
    mean = sum(per_window) / 6
    spread = math.sqrt(sum((x - mean) ** 2 for x in per_window) / 5 / 6)
    ppl, se = perplexity_with_se(model, ids, batch_size=4)
    assert ppl == pytest.approx(math.exp(mean), rel=1e-5) and se == pytest.approx(ppl * spread, rel=1e-4)
    assert perplexity(model, ids, batch_size=1) == pytest.approx(ppl, rel=1e-6)  # batch size does not matter
    assert perplexity_with_se(model, ids, batch_size=1)[1] == pytest.approx(se, rel=1e-5)


def test_one_window_has_no_standard_error(model):
    ppl, se = perplexity_with_se(model, windows(1))
    assert ppl > 1 and math.isnan(se)
    assert with_se({"ppl": ppl, "ppl_se": se}, "ppl") == f"{ppl:.2f}"  # shown without a meaningless ± nan


def test_standard_errors_of_means_and_accuracies():
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0)  # sd √2, over √2
    assert math.isnan(standard_error([2.0]))
    assert binomial_se(0.5, 500) == pytest.approx(0.02236, abs=1e-5)
    assert binomial_se(0.0, 10) == 0.0
    assert mean_se([0.03, 0.04]) == pytest.approx(0.025)  # √(0.03² + 0.04²) / 2


@pytest.mark.parametrize("a, se_a, b, se_b, z, expected", [
    (10.0, 1.0, 11.0, 1.0, 2.0, True),  # 1 ≤ 2·√2
    (10.0, 1.0, 13.0, 1.0, 2.0, False),  # 3 > 2.83
    (10.0, 1.0, 13.0, 1.0, 3.0, True),
    (0.41, 0.0, 0.41, 0.0, 2.0, True),  # equal figures without error bars
    (0.41, 0.0, 0.42, 0.0, 2.0, False),
])
def test_within_noise(a, se_a, b, se_b, z, expected):
    assert within_noise(a, se_a, b, se_b, z=z) is expected
    assert within_noise(b, se_b, a, se_a, z=z) is expected  # symmetric


def test_with_se_formats_a_figure_and_its_error():
    assert with_se({"acc": 0.4123, "acc_se": 0.0221}, "acc", ".3f") == "0.412 ± 0.022"
    assert with_se({"params": 1234567}, "params", ",.0f") == "1,234,567"


def test_lm_eval_results_keep_accuracy_standard_errors():
    raw = {"cloze": {"alias": "cloze", "acc,none": 0.25, "acc_stderr,none": "N/A", "perplexity,none": 40.0,
                     "perplexity_stderr,none": "N/A", "sample_len": 100},
           "choice": {"acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.6, "acc_norm_stderr,none": "N/A",
                      "sample_len": 100},
           "gsm": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": "N/A", "sample_len": 100}}
    cleaned = clean_results(raw)
    assert cleaned["cloze"] == {"acc": 0.25, "acc_se": pytest.approx(math.sqrt(0.25 * 0.75 / 100)),
                                "perplexity": 40.0, "examples": 100.0}  # no binomial SE for a perplexity
    assert cleaned["choice"]["acc_se"] == 0.05  # lm-eval's own, when it computed one
    assert cleaned["choice"]["acc_norm_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100))
    assert cleaned["gsm"]["exact_match,strict-match_se"] == pytest.approx(0.03)


def test_pipeline_evaluation_records_perplexity_standard_errors(model):
    data = held_out_data(sotu=4, moby=3)
    results = evaluate(model, data, eval_teacher=None)
    assert sorted(results) == ["ppl_moby", "ppl_moby_se", "ppl_sotu", "ppl_sotu_se", "windows"]
    assert results["windows"]["split"] == "test"  # a reported figure reads the test windows unless told otherwise
    for name, ids in data.eval_windows("test").items():
        assert (results[f"ppl_{name}"], results[f"ppl_{name}_se"]) == pytest.approx(perplexity_with_se(model, ids))
        assert 0 < results[f"ppl_{name}_se"] < results[f"ppl_{name}"]


def test_evaluations_share_one_forward_pass_per_window_set_and_give_the_separate_passes_figures(model):
    """evaluate_dense makes the KL teacher from its in-domain perplexity pass, and evaluate takes the KL from
    the same pass as the in-domain perplexity: one forward per window set, the figures of separate passes."""
    from darwinlm.core.evaluation.held_out import dense_eval_teacher, evaluate_dense
    from darwinlm.core.search.fitness import kl_per_token

    data = held_out_data(sotu=5, moby=3)
    eval_windows = data.eval_windows("test")
    student = tiny_model("llama", seed=9).eval()
    forwards = []
    handles = [m.register_forward_hook(lambda _m, args, _out: forwards.append(args[0].shape[0]))
               for m in (model.model.embed_tokens, student.model.embed_tokens)]
    dense_row, teacher = evaluate_dense(model, data, top_k=8)
    student_row = evaluate(student, data, teacher)
    for handle in handles:
        handle.remove()
    assert sum(forwards) == 2 * (5 + 3)  # each window once per model

    separate = dense_eval_teacher(model, data, 8)
    assert torch.equal(teacher.input_ids, separate.input_ids) and torch.equal(teacher.top_ids, separate.top_ids)
    assert torch.equal(teacher.top_logprobs, separate.top_logprobs)
    assert dense_row["kl"] == 0.0
    assert dense_row["ppl_sotu"] == perplexity_with_se(model, eval_windows["sotu"])[0]
    assert student_row["kl"] == kl_per_token(student, separate) > 0
    assert student_row["ppl_moby"] == perplexity_with_se(student, eval_windows["moby"])[0]
    with pytest.raises(ValueError, match="first evaluation set"):
        evaluate(student, data, separate.rows(torch.arange(4)))
    with pytest.raises(ValueError, match="first evaluation set's validation windows"):
        evaluate(student, data, separate, split="validation")  # a test-window teacher cannot score validation


def test_the_default_corpus_reports_each_figure_under_its_text_s_name(model, tmp_path):
    """ppl_sotu, ppl_moby, ..., the names bench results use too; the KL is taken on sotu, the in-domain set."""
    from darwinlm.core.data.default_corpus import default_split
    from darwinlm.core.data.windows import held_out_windows
    from darwinlm.core.evaluation.held_out import dense_eval_teacher, evaluation_table, validation_figures
    from tests.support.default_text import write_miniature_default_text
    from tests.support.tiny_models import tiny_tokenizer

    split = default_split(write_miniature_default_text(
        tmp_path, {f"{year}_president": f"Address of {year}. The state of the Union. " * 4
                   for year in (1790, 1950, 1990, 2016)},
        {chapter: f"CHAPTER {chapter}. Call me Ishmael. " * 6 for chapter in (1, 2)}))
    empty = torch.zeros(0, 16, dtype=torch.long)
    data = PreparedData(split=split, calibration_ids=empty, teacher_pool_ids=empty, train_ids=empty,
                        post_train_ids=empty,
                        held_out={name: held_out_windows(docs, tiny_tokenizer(), 16, 2)
                                  for name, docs in split.evaluation.items()})
    teacher = dense_eval_teacher(model, data, 8)
    assert torch.equal(teacher.input_ids, data.eval_windows("test")["sotu"])
    row = evaluate(model, data, teacher)
    assert {key for key in row if key.startswith("ppl_")} == {
        f"ppl_{name}{se}" for name in ("sotu", "moby", "email", "npm_docs") for se in ("", "_se")}
    validation = validation_figures(model, data)  # every set's, for choices made on out-of-domain text too
    assert {key for key in validation if key.startswith("ppl_")} == {key for key in row if key.startswith("ppl_")}
    assert validation["windows"]["split"] == "validation" and set(validation["windows"]["sets"]) == set(split.evaluation)
    assert validation["ppl_email"] != row["ppl_email"]  # other windows than the test figure's
    table = evaluation_table(row, row, split)
    assert table["in_domain"] == "sotu"
    assert table["labels"] == {"sotu": "State of the Union 1990+", "moby": "Moby-Dick",
                               "email": "e-mail (SpamAssassin ham, 2002)", "npm_docs": "npm CLI manual"}
