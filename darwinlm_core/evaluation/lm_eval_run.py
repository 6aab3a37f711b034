"""Run lm-eval tasks on an in-memory model: local darwinlm_* tasks (evaluation.task_files) or standard ones.

lm_eval is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

from typing import Sequence

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.metrics import SE_SUFFIX, binomial_se
from darwinlm.core.evaluation.task_files import TASK_PREFIX, local_task_names

# Metrics that average a 0/1 score per example, so that their standard error is binomial.
BINARY_METRICS = ("acc", "acc_norm", "exact_match")


def task_manager_for(tasks: Sequence[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`; raises DarwinLMError naming the unknown ones.

    lm-eval's built-in tasks are indexed (~13 s) only when a requested name is not a local darwinlm_* task.
    Call it before loading a model to fail fast on a typo.
    """
    if not tasks:
        raise DarwinLMError("no lm-eval tasks given", "name at least one task")
    local = local_task_names(include_path)
    missing_local = [task for task in tasks if task.startswith(TASK_PREFIX) and task not in local]
    if missing_local:  # ours by name, so no need to index lm-eval's built-in tasks to know it is unknown
        raise DarwinLMError(_unknown_tasks_message(missing_local, local, include_path))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=not set(tasks) <= set(local))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise DarwinLMError(_unknown_tasks_message(unknown, local, include_path))
    return manager


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "cpu",
    task_manager=None,
) -> dict[str, dict[str, float]]:
    """Evaluate an in-memory HF causal LM on lm-eval tasks → {task: {metric: value}}, e.g. {"acc": 0.41}.

    Tasks are local (written by write_local_tasks into include_path) or standard lm-eval names (arc_easy, ...),
    which download their data and so need a network. `task_manager`: one from task_manager_for(tasks,
    include_path), to skip checking the names again. `limit` caps the examples per task. Metric names lose
    lm-eval's filter suffix ("acc,none" → "acc"), accuracies carry a binomial standard error `acc_se` (see
    clean_results), and `examples` counts the examples scored. The model is used where it is: move it to `device` first.
    """
    manager = task_manager or task_manager_for(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)
    except ConnectionError as error:  # offline: datasets/huggingface_hub raise ConnectionError subclasses
        raise DarwinLMError(
            f"could not load the data of lm-eval tasks {', '.join(tasks)}: "
            f"{(str(error).strip().splitlines() or [type(error).__name__])[0]}",
            "standard lm-eval tasks download from the Hugging Face hub: with a network, set HF_HUB_OFFLINE=0 and "
            "HF_DATASETS_OFFLINE=0; offline, use the local darwinlm_* tasks",
        ) from error
    return clean_results(results["results"])


def _unknown_tasks_message(unknown: list[str], local: list[str], include_path) -> str:
    where = f"local tasks in {include_path}: {', '.join(local) or 'none'}" if include_path else (
        "no local task folder was given (write one with write_local_tasks)")
    return (f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; {where}; standard "
            "lm-eval tasks (arc_easy, hellaswag, ...) are found by name but need a network to download their data")


def clean_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's {task: {"acc,none": 0.4, "acc_stderr,none": "N/A", "alias": ..., "sample_len": 10}} →
    {task: {"acc": 0.4, "acc_se": 0.155, "examples": 10.0}}: filter suffixes "none" dropped (others kept).

    Standard errors are `<metric>_se`. run_lm_eval asks lm-eval for none (bootstrap_iters=0: its bootstrap of
    other metrics costs minutes), so those of the 0/1 accuracies (BINARY_METRICS) are computed here, binomial:
    √(p(1 − p)/n) over the n examples scored (lm-eval's own, given bootstrap_iters > 0, uses n − 1: a hair
    larger). A numeric stderr that lm-eval did report is kept as it is.
    """
    cleaned = {}
    for task, metrics in results.items():
        row, errors = {}, {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "N/A" stderrs, aliases
            target = errors if metric.endswith("_stderr") else row
            metric = "examples" if metric == "sample_len" else metric.removesuffix("_stderr")
            target[metric if filter_name in ("", "none") else f"{metric},{filter_name}"] = float(value)
        for metric, value in list(row.items()):
            if metric in errors:
                row[metric + SE_SUFFIX] = errors[metric]
            elif metric.partition(",")[0] in BINARY_METRICS and "examples" in row:
                row[metric + SE_SUFFIX] = binomial_se(value, int(row["examples"]))
        cleaned[task] = row
    return cleaned
