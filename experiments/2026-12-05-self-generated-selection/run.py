"""Issue 39's remedy "selection scored on a mix of domains", with text no user has to supply: half of the search's
selection pool is text sampled from the dense model itself, which spans the genres the model was trained on.

    PYTHONPATH=. .venv/bin/python experiments/2026-12-05-self-generated-selection/run.py ARM [ARM ...]

Arms (each writes runs/<arm>.json; an arm already there is skipped):
- `control-informed`: the demo preset's informed start on the plain pool, through this script. It must reproduce
  the pipeline's own informed start (experiments/2026-12-05-out-of-domain-validation: validation 56.8 / 221.9 /
  223.3 / 268.4), which shows the script refits and post-trains as `darwinlm compress` does;
- `mixed-informed`: the informed start with its KL slopes measured on the mixed pool;
- `mixed-seed<N>`: the demo's search (50 generations from the better start) selecting on the mixed pool;
- `mixedsel-seed<N>`: the same search, but from the plain pool's informed start (its slopes measured on State of
  the Union, as the pipeline does): only selection sees the mixed pool;
- `mixedsel25-seed<N>`: as `mixedsel`, with a quarter of the selection rows generated instead of half (48 of the
  plain pool's rows, then every fourth row generated).

Everything else is the smollm2-demo preset at 50%: the same database, calibration rows, post-training rows, teacher
and schedule, and the refit. The mixed pool keeps the preset's 68 rows: the 4 fixed rows (the start's choice and
the fixed-row trajectory) stay State of the Union; of the 64 selection rows, 32 are State of the Union (the pool's
first 32) and 32 are sampled from the dense model (each from `<|endoftext|>`, temperature 1, top-p 0.95,
seed 0; runs/generated.pt keeps them), interleaved. Every arm reads every evaluation set's validation windows (they
choose) and test windows (reported only beside them).
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).parent
RUNS = HERE / "runs"
GENERATED_ROWS = 32
TOP_P = 0.95


def generated_rows(model, tokenizer, count: int, seq_len: int) -> torch.Tensor:
    """`count` rows of `seq_len` tokens sampled from `model`, each starting after the document separator of its
    pretraining text (`<|endoftext|>`, so a fresh document of any genre; SmolLM2's BOS is the chat template's
    `<|im_start|>`, which starts a chat turn); kept in runs/."""
    path = RUNS / "generated.pt"
    if path.exists():
        return torch.load(path)
    torch.manual_seed(0)
    start = torch.full((count, 1), tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    with torch.no_grad():
        rows = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                              top_p=TOP_P, top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                              pad_token_id=tokenizer.eos_token_id)
    torch.save(rows, path)
    (RUNS / "generated-samples.txt").write_text(
        "\n\n=====\n\n".join(tokenizer.decode(row[:160]) for row in rows[:6]))
    return rows


def mixed_pool(pool: torch.Tensor, generated: torch.Tensor, fixed_rows: int, every: int = 2) -> torch.Tensor:
    """The fixed rows, then as many selection rows as the pool had, of which every `every`-th is generated and the
    rest are the pool's own, in order."""
    selection = pool[fixed_rows:]
    own = (every - 1) * selection.shape[0] // every
    groups = torch.cat([selection[:own].reshape(-1, every - 1, pool.shape[1]),
                        generated[: selection.shape[0] - own].unsqueeze(1)], dim=1)
    return torch.cat([pool[:fixed_rows], groups.reshape(-1, pool.shape[1])])


def main(arms: list[str]) -> None:
    from darwinlm.core import store_layout
    from darwinlm.core.compression import build_search, post_train, refit_weights
    from darwinlm.core.config import load_preset
    from darwinlm.core.data.prepared import prepare_data
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.refit import RefitDatabase
    from darwinlm.core.database.store import build_database
    from darwinlm.core.evaluation.held_out import dense_eval_teacher, evaluate, validation_figures
    from darwinlm.core.home import data_home
    from darwinlm.core.model.loading import load_model
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.genome import Budget, Genome
    from darwinlm.flows.offline import apply_offline_defaults

    apply_offline_defaults()
    RUNS.mkdir(exist_ok=True)
    # generated_share 0: this script mixes the pool itself (it ran before the core did, and its arms set the mix)
    config = load_preset("smollm2-demo", {"evaluate": {"tasks": ""}, "search": {"generated_share": 0.0}})
    model, tokenizer = load_model(config.model)
    data = prepare_data(config.data, tokenizer)
    top_k = config.teacher_top_k
    database = build_database(model, data.calibration_ids, store_layout.databases(str(data_home())),
                              calibration_digest=data.calibration_digest, config=config.database, progress=True)
    plain_teacher = compute_teacher(model, data.teacher_pool_ids, top_k)
    mixed = mixed_pool(data.teacher_pool_ids, generated_rows(model, tokenizer, GENERATED_ROWS, config.data.seq_len),
                       config.search.fixed_rows)
    mixed_teacher = compute_teacher(model, mixed, top_k)
    if any(arm.startswith("mixedsel25-") for arm in arms):
        quarter = mixed_pool(data.teacher_pool_ids, torch.load(RUNS / "generated.pt"), config.search.fixed_rows, every=4)
        quarter_teacher = compute_teacher(model, quarter, top_k)
    post_teacher = compute_teacher(model, data.post_train_ids, top_k)
    eval_teacher = dense_eval_teacher(model, data, top_k)
    budget = Budget.from_database(database, fraction_removed=config.search.fraction_removed,
                                  seq_len=config.data.seq_len)
    assembly = LiveAssembly(model, database)

    for arm in arms:
        out = RUNS / f"{arm}.json"
        if out.exists():
            print(f"{arm}: already in {out}", flush=True)
            continue
        plain = arm.startswith("control")
        seed = int(arm.rsplit("-seed", 1)[1]) if "-seed" in arm else 0
        search_config = replace(config.search, seed=seed, **({"start": "informed"} if arm.endswith("informed") else {}))
        pool, teacher = (data.teacher_pool_ids, plain_teacher) if plain else (mixed, mixed_teacher)
        if arm.startswith("mixedsel25-"):
            pool, teacher = quarter, quarter_teacher
        search = build_search(replace(config, search=search_config), assembly, replace(data, teacher_pool_ids=pool),
                              teacher, progress=True)
        if arm.startswith("mixedsel"):
            plain_start, plain_record = build_search(
                replace(config, search=replace(search_config, start="informed")), assembly, data, plain_teacher
            ).choose_start()
            search.choose_start = lambda: (plain_start, {**plain_record, "from": "the plain pool's informed start"})
        started = time.perf_counter()
        if arm.endswith("informed"):
            levels, start = search.choose_start()
            record = {"start": start}
        else:
            state = search.run()
            levels = tuple(state.parent)
            record = {"start": state.start, "fixed_kl": [h["fixed_kl"] for h in state.history]}
        genome = Genome(levels, database.digest)
        record.update(arm=arm, seed=seed, levels=list(levels), params_kept=int(budget.cost(levels)),
                      search_s=time.perf_counter() - started)
        assembly.apply({key: 0 for key in genome.assignment()}, rebuild=True)  # the refit starts dense
        assembly.database = RefitDatabase(database, refit_weights(config, model, database, genome, data))
        try:
            post_train(assembly, genome, data.post_train_ids, config, teacher=post_teacher, progress=True)
            record["validation"] = validation_figures(model, data)
            record["test"] = evaluate(model, data, eval_teacher, split="test")
        finally:
            assembly.database = database
        record["commit"] = subprocess_commit()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(out)
        print(arm, {k: round(v, 1) for k, v in record["validation"].items() if k.startswith("ppl_")}, flush=True)


def subprocess_commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    if not sys.argv[1:]:
        sys.exit("name the arms to run: control-informed, mixed-informed, mixed-seed0, ...")
    main(sys.argv[1:])
