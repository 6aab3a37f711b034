"""Run lm-eval tasks on an in-memory model: local darwinlm_* tasks (evaluation.task_files) or standard ones.

lm_eval is imported inside functions: importing it takes seconds.
"""

from __future__ import annotations

from typing import Sequence

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.evaluation.task_files import TASK_PREFIX, local_task_names


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
    lm-eval's filter suffix ("acc,none" → "acc"), standard errors are left out, and `examples` counts the
    examples scored. The model is used where it is: move it to `device` first.
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
    """lm-eval's {task: {"acc,none": 0.4, "acc_stderr,none": ..., "alias": ..., "sample_len": 10}} →
    {task: {"acc": 0.4, "examples": 10.0}}: filter suffixes "none" dropped (others kept), stderrs left out."""
    cleaned = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = "examples" if metric == "sample_len" else metric
            row[metric if filter_name in ("", "none") else f"{metric},{filter_name}"] = float(value)
        cleaned[task] = row
    return cleaned
