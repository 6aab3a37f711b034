"""Held-out evaluation: perplexity per evaluation set with its standard error over windows, KL to the dense
model, offline zero-shot accuracy, and the dense-vs-pruned table a compression reports.

Every function reads the windows of one split: 'test' for reported results, 'validation' for anything that
chooses (darwinlm.core.data.windows).
"""

import torch

from darwinlm.core.data.prepared import PreparedData
from darwinlm.core.data.splits import CorpusSplit
from darwinlm.core.data.windows import TEST, VALIDATION
from darwinlm.core.evaluation.metrics import perplexity_with_se
from darwinlm.core.search.fitness import CompactTeacher, compute_teacher, kl_per_position, teacher_top_k


def evaluate(model, data: PreparedData, eval_teacher: CompactTeacher | None, batch_size: int = 4,
             progress: bool = False, split: str = TEST) -> dict:
    """Held-out perplexity per evaluation set (`ppl_<set>`, the set named by its text: ppl_sotu) with its
    standard error over windows (`ppl_<set>_se`), and KL to the dense model on the in-domain windows (the first
    set's, CorpusSplit puts it first; from the same forward pass as their perplexity), all on the `split` windows: 'test' for reported results, 'validation' for anything that
    chooses. `windows` records what was read (PreparedData.windows_used)."""
    windows = data.eval_windows(split)
    kl_rows: list[float] = []
    if eval_teacher is not None and not torch.equal(eval_teacher.input_ids, next(iter(windows.values()))):
        raise ValueError(f"eval_teacher is not of the first evaluation set's {split} windows (see dense_eval_teacher)")

    def kl_of(rows: slice, logits: torch.Tensor) -> None:
        teacher = eval_teacher.rows(torch.arange(rows.start, rows.stop))
        kl = kl_per_position(logits, teacher.top_logprobs.to(logits.device), teacher.top_ids.to(logits.device))
        kl_rows.extend(kl.mean(-1).tolist())

    results = _perplexities(model, windows, batch_size, progress, kl_of if eval_teacher is not None else None)
    if eval_teacher is not None:
        results["kl"] = sum(kl_rows) / len(kl_rows)
    results["windows"] = data.windows_used(split)
    return results


def evaluate_dense(model, data: PreparedData, top_k: int, batch_size: int = 4, progress: bool = False,
                   split: str = TEST) -> tuple[dict, CompactTeacher]:
    """`evaluate` of the dense model with the teacher it is scored against, made from the same forward pass as
    the in-domain perplexity: the teacher `dense_eval_teacher` gives, without a pass of its own. Its KL, to its
    own compact form, is 0, and is measured like any other."""
    windows = data.eval_windows(split)
    top_logprobs, top_ids, kl_rows = [], [], []

    def keep_teacher(_rows: slice, logits: torch.Tensor) -> None:
        values, ids = teacher_top_k(logits, top_k)
        top_logprobs.append(values)
        top_ids.append(ids)
        kl_rows.extend(kl_per_position(logits, values.to(logits.device), ids.to(logits.device)).mean(-1).tolist())

    results = _perplexities(model, windows, batch_size, progress, keep_teacher)
    results["kl"] = sum(kl_rows) / len(kl_rows)
    results["windows"] = data.windows_used(split)
    return results, CompactTeacher(next(iter(windows.values())), torch.cat(top_logprobs), torch.cat(top_ids))


def validation_figures(model, data: PreparedData, batch_size: int = 4, progress: bool = False) -> dict:
    """Every evaluation set's perplexity (`ppl_<set>`, `ppl_<set>_se`) on its validation windows, with the
    `windows` it read: the figures choices read, so the reported test figures play no part in them. The
    in-domain one decides which compressed model users get (the registry's alias); the out-of-domain ones are
    the validation text that settings are chosen on (experiments/2026-12-05-out-of-domain-validation)."""
    row = _perplexities(model, data.eval_windows(VALIDATION), batch_size, progress, None)
    return {**row, "windows": data.windows_used(VALIDATION)}


def _perplexities(model, windows_by_set: dict[str, torch.Tensor], batch_size: int, progress: bool,
                  on_first_logits) -> dict[str, float]:
    """ppl_<set> and ppl_<set>_se of every evaluation set; `on_first_logits` sees the first set's logits."""
    results = {}
    for index, (name, windows) in enumerate(windows_by_set.items()):
        results[f"ppl_{name}"], results[f"ppl_{name}_se"] = perplexity_with_se(
            model, windows, batch_size=batch_size, progress=progress, desc=f"ppl {name}",
            on_logits=on_first_logits if index == 0 else None)
    return results


def dense_eval_teacher(model, data: PreparedData, top_k: int, split: str = TEST) -> CompactTeacher:
    """The dense model's compact log-probs on the first (the in-domain) evaluation set's `split` windows, for
    the KL column of evaluations on that split."""
    return compute_teacher(model, next(iter(data.eval_windows(split).values())), top_k)


def zero_shot_scores(model, tokenizer, split: CorpusSplit, tasks: str, limit: int | None) -> dict:
    """Accuracy per lm-eval task in `tasks` (comma-separated; offline `local` tasks, built from `split`'s held-out
    text, expanded) on at most `limit` examples each, as acc_<task> with its binomial standard error acc_<task>_se,
    and their mean as zeroshot_acc ± zeroshot_acc_se (tasks independent)."""
    if not tasks:
        return {}
    import tempfile

    from darwinlm.core.evaluation.lm_eval_run import run_lm_eval
    from darwinlm.core.evaluation.metrics import mean_se
    from darwinlm.core.evaluation.task_files import expand_local, task_names, write_local_tasks

    with tempfile.TemporaryDirectory() as folder:
        names = expand_local(task_names(tasks), write_local_tasks(split, folder))
        scores = run_lm_eval(model, tokenizer, names, include_path=folder, limit=limit,
                             device=str(next(model.parameters()).device))
    scored = {name: metrics for name, metrics in scores.items() if "acc" in metrics}
    if not scored:
        return {}
    results = {}
    for name, metrics in scored.items():
        results[f"acc_{name}"], results[f"acc_{name}_se"] = metrics["acc"], metrics["acc_se"]
    results["zeroshot_acc"] = sum(metrics["acc"] for metrics in scored.values()) / len(scored)
    results["zeroshot_acc_se"] = mean_se([metrics["acc_se"] for metrics in scored.values()])
    return results


def evaluation_table(dense_row: dict, pruned_row: dict, split: CorpusSplit | None = None) -> dict:
    """{"dense", "pruned", "windows"}: the two models' rows, which must have read the same windows; the windows'
    record sits beside them once, so the rows stay figures only (each is logged as metrics). With the `split`
    they were measured on, also `labels` (evaluation set → what it is, in words) and `in_domain` (the set of the
    calibration text's own domain), so that a table of `ppl_<set>` rows (a model card) needs nothing else."""
    dense_row, pruned_row = dict(dense_row), dict(pruned_row)
    windows = pruned_row.pop("windows")
    if dense_row.pop("windows", windows) != windows:
        raise ValueError(f"the dense and pruned evaluations read different windows: {windows}")
    table = {"dense": dense_row, "pruned": pruned_row, "windows": windows}
    if split is not None:
        table["labels"] = {name: split.label(name) for name in split.evaluation}
        table["in_domain"] = split.in_domain
    return table
