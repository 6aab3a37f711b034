"""The summary table a compression ends with: its rows are named after the run's data, not a fixed corpus."""

from darwinlm.core.data.sources import Document
from darwinlm.core.data.splits import split_documents
from darwinlm.flows.report import print_summary, rows

EVALUATION = {"dense": {"params": 100, "ppl_in_domain": 10.0, "ppl_in_domain_se": 0.25, "kl": 0.0},
              "pruned": {"params": 60, "ppl_in_domain": 12.5, "ppl_in_domain_se": 0.3, "kl": 0.2}}


def summary(labels: dict) -> dict:
    return {"evaluation": EVALUATION, "evaluation_labels": labels, "kept_params": 6, "dense_params": 10,
            "wall_s": 1.0, "model_uri": "/m", "mlflow_run_id": "r", "registered_model": "x", "registered_version": "1"}


def test_perplexity_rows_are_labelled_by_the_data_source(capsys):
    documents = [Document(f"doc{i}", f"text number {i} " * 5) for i in range(60)]
    split = split_documents(documents, source_name="my_corpus.jsonl")
    print_summary(summary(split.describe()["labels"]))
    table = capsys.readouterr().out
    assert "ppl held-out my_corpus.jsonl" in table and "12.50" in table
    assert "SOTU" not in table and "Moby" not in table
    # the UIs are started through darwinlm, which keeps its store and telemetry defaults
    assert "`darwinlm mlflow-ui`" in table and "`darwinlm server`" in table and "mlflow ui --" not in table


def test_the_default_corpus_rows_are_named_by_their_texts_in_domain_first():
    from darwinlm.core.data.default_corpus import EVALUATION_LABELS

    evaluation = {"dense": {"ppl_sotu": 25.0, "ppl_moby": 60.0}, "pruned": {"ppl_sotu": 30.0, "ppl_moby": 90.0}}
    labels = [(label, key) for label, key, _ in rows(evaluation, EVALUATION_LABELS) if key.startswith("ppl_")]
    assert labels == [("ppl State of the Union 1990+", "ppl_sotu"), ("ppl Moby-Dick", "ppl_moby")]


def test_every_evaluation_set_gets_a_row_even_without_labels():
    evaluation = {"dense": {"ppl_a": 1.0, "ppl_b_set": 2.0}, "pruned": {"ppl_a": 1.5, "ppl_b_set": 3.0}}
    labels = [label for label, key, _ in rows(evaluation, {"a": "corpus A"}) if key.startswith("ppl_")]
    assert labels == ["ppl corpus A", "ppl b-set"]


def test_figures_show_their_standard_errors_and_no_row_of_their_own(capsys):
    evaluation = {side: {**row, "zeroshot_acc": acc, "zeroshot_acc_se": 0.02, "acc_darwinlm_x": acc,
                         "acc_darwinlm_x_se": 0.03} for (side, row), acc in zip(EVALUATION.items(), (0.5, 0.45))}
    print_summary({**summary({}), "evaluation": evaluation})
    table = capsys.readouterr().out
    assert "10.00 ± 0.25" in table and "12.50 ± 0.30" in table
    assert "0.500 ± 0.020" in table and "0.450 ± 0.030" in table  # mean, then the task's own row
    assert "_se" not in table and "in-domain-se" not in table
    assert [label for label, *_ in rows(evaluation, {})].count("ppl in-domain") == 1


def test_prefect_summary_artifact_rows_carry_standard_errors():
    from darwinlm.flows.artifacts import summary_rows

    table = summary_rows(EVALUATION)
    assert [row["figure"] for row in table] == ["ppl_in_domain", "params", "kl"]
    assert table[0] == {"figure": "ppl_in_domain", "dense": "10 ± 0.25", "pruned": "12.5 ± 0.3"}
