"""What a compression shows in the Prefect UI's Artifacts tab: search progress, the summary table, links.

Users start compressions from the Prefect UI and look there first, so each run leaves: a progress artifact the
search updates every generation, a dense-vs-pruned table, the greedy samples, and a link to its MLflow run and
registered version. Keys are per run: the base model's name and the run's config digest (lowercase, digits and
dashes, as Prefect requires), so the catalog shows each run's own, and a re-run of one config its history.
"""

import os
import re

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from darwinlm.core.evaluation.metrics import is_se_key, with_se

# `mlflow ui` serves on this address unless told otherwise; a team's tracking server sets its own
MLFLOW_UI_URL = os.environ.get("DARWINLM_MLFLOW_UI_URL", "http://127.0.0.1:5000")
SUMMARY_ROWS = ("params", "kl", "zeroshot_acc", "prefill_tokens_per_s")


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def run_prefix(model: str, config_digest: str) -> str:
    """What every artifact key of one compression starts with: `smollm2-3f2a9c1b07de`."""
    return artifact_key(model, config_digest[:12])


class SearchProgress:
    """A progress artifact that the search moves forward each generation, with the trajectory in its text.
    Made in the compress flow, so it shows on the compress run; the search subflow updates it by id."""

    def __init__(self, generations: int, artifact_id):
        self.generations, self.artifact_id = max(generations, 1), artifact_id

    @classmethod
    def create(cls, prefix: str, generations: int) -> "SearchProgress":
        if generations == 0:  # a baseline: nothing to wait for
            return cls(0, create_progress_artifact(100.0, key=artifact_key(prefix, "search-progress"),
                                                   description="no search (0 generations): the start is the model"))
        return cls(generations, create_progress_artifact(0.0, key=artifact_key(prefix, "search-progress"),
                                                         description=f"search: 0 of {generations} generations"))

    def update(self, record: dict) -> None:
        done = record["generation"] + 1
        update_progress_artifact(
            self.artifact_id, 100.0 * done / self.generations,
            description=f"search: {done} of {self.generations} generations · parent KL on fixed rows "
                        f"{record['fixed_kl']:.4f} · acceptance {record['acceptance_rate']:.0%} · move size "
                        f"{record['move_size']}")


def summary_rows(evaluation: dict) -> list[dict]:
    """One row per figure, dense beside pruned, each `value ± standard error` where there is one;
    perplexities named after their evaluation sets."""
    dense, pruned = evaluation["dense"], evaluation["pruned"]
    keys = [k for k in dense if k.startswith("ppl_") and not is_se_key(k)] + [k for k in SUMMARY_ROWS if k in dense]
    return [{"figure": key, "dense": with_se(dense, key, ".4g"), "pruned": with_se(pruned, key, ".4g")}
            for key in keys if key in pruned]


def publish_summary(prefix: str, summary: dict, experiment_id: str) -> None:
    """The summary table, the greedy samples one above the other, and the MLflow links, as Prefect artifacts
    keyed by the run's `prefix` (run_prefix)."""
    evaluation = summary["evaluation"]
    create_table_artifact(summary_rows(evaluation), key=artifact_key(prefix, "compression-summary"),
                          description=f"dense vs pruned, {summary['kept_params'] / summary['dense_params']:.1%} "
                                      f"of block parameters kept")
    sample = evaluation.get("sample")
    if sample:
        create_markdown_artifact(greedy_sample_markdown(sample), key=artifact_key(prefix, "greedy-sample"),
                                 description="greedy continuation of a held-out prompt, dense then pruned")
    run_url = f"{MLFLOW_UI_URL}/#/experiments/{experiment_id}/runs/{summary['mlflow_run_id']}"
    create_link_artifact(run_url, link_text=f"MLflow run {summary['mlflow_run_id']}",
                         key=artifact_key(prefix, "mlflow-run"))
    create_link_artifact(f"{MLFLOW_UI_URL}/#/models/{summary['registered_model']}/versions/"
                         f"{summary['registered_version']}",
                         link_text=f"{summary['registered_model']} v{summary['registered_version']}",
                         key=artifact_key(prefix, "registered-model"))


def greedy_sample_markdown(sample: dict) -> str:
    """Prompt, dense and pruned continuations stacked, each a quoted paragraph: prose wraps at any width, where
    a table's columns did not (the pruned column, the one that shows degeneration, was cut off at 1400 px)."""
    return "\n\n".join(f"**{title}**\n\n> {_quoted(sample[key])}" for title, key in (
        ("Prompt (held-out text)", "prompt"), ("Dense model", "dense"), ("Pruned model", "pruned")))


def _quoted(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"
