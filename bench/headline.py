"""The headline: what darwinlm's default pipeline achieves on SmolLM2 against the genomes and peers a user could
pick instead, at 30% and 50% of block parameters removed, before and after the same post-training, on the test
windows (the validation windows made every choice; see darwinlm.core.data.windows).

    python -m bench.headline [--targets 0.5,0.3] [--seeds 0,1,2] [--model smollm2] [--results headline]

Methods, each on the smollm2-demo preset's data (the same calibration rows, test windows, post-training rows,
teacher and schedule):
- `uniform`: every module at the level nearest the target, from darwinlm's database;
- `informed_start`: the database's budget-exact least slope-weighted error (the search's informed start);
- `darwinlm`: the default pipeline, `darwinlm compress --preset smollm2-demo` at that fraction: the search from
  the better start, then its refit (part of darwinlm's method), then post-training; one row per seed in `seeds`;
- the peers (bench/peers, each written from its paper; its module docstring says where it departs), on the same
  calibration rows, then the same post-training (rows, teacher, schedule, distillation) and test windows, with no
  refit (the refit is part of darwinlm's method): `tp_taylor_uniform`, `tp_global` (torch-pruning's Taylor
  pruning, uniform and global), `flap`, `slimgpt`, `ziplm_dp` (darwinlm's database and a DP over its stored
  errors, no slopes, no search), `shortgpt` (whole blocks) and `wanda_sp`. Each lands within 0.5% of the target.
uniform and informed_start are refitted too before post-training, as the pipeline would ship them.

Row keys (`targets.<fraction>.<method>`): `ppl_<text>` and `ppl_<text>_se` before post-training, for text in
`sotu` (in domain) and `moby`; `ppl_<text>_posttrained(_se)` after, for `sotu` and every one of the `ood_texts`
(`moby`, `email`, `npm_docs`); the `dense` row has `ppl_<text>(_se)` for every text; `params_kept`;
`wall_s` (the method's own work up to the pruned model) and `post_train_s`; the shipped model's speed in llama.cpp
(issue 38), each timed against dense converted by llama.cpp's own converter in the same interleaved rounds (2
threads, one 512-token prompt, 64 decoded tokens): `llamacpp_prefill_speedup_f16`, `llamacpp_decode_speedup_f16` and
`llamacpp_prefill_speedup_q8_0`, or `llamacpp_unsupported` saying why a model has no GGUF; seeded rows add
`<key>_sd` (population sd over seeds) and `seeds`. A stopped run resumes from its saved rows when rerun with the
same arguments, if the code that measures them (MEASURED_BY) is unchanged since.
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.results_file import provenance, resumable_partial, write_partial, write_results
from darwinlm.core import store_layout
from darwinlm.core.data.default_corpus import EVALUATION_LABELS, IN_DOMAIN_SET
from darwinlm.flows.offline import apply_offline_defaults

# The default corpus's out-of-domain texts: every evaluation set but the calibration text's own (moby). The
# core names each figure by its text (ppl_sotu, ppl_moby), so the rows carry the core's names as they are.
OOD_TEXTS = [name for name in EVALUATION_LABELS if name != IN_DOMAIN_SET]
# Rows are read before post-training on SOTU and Moby-Dick (the reported out-of-domain text), and after it, as
# users get them, on every text. Reading e-mail and npm's manual one-shot too would cost about 35 more minutes on 2
# cores for figures nothing reports or chooses on.
ONE_SHOT_TEXTS = [IN_DOMAIN_SET, OOD_TEXTS[0]]
SEEDED_METHODS = ("darwinlm",)
PEERS = ("tp_taylor_uniform", "tp_global", "flap", "slimgpt", "ziplm_dp", "shortgpt", "wanda_sp")  # bench.peers
MEASURED_BY = ("darwinlm_core", "tasks", "flows", "requirements", "bench/headline.py", "bench/peers", "bench/gguf.py")
LLAMA_CPP_QUANTS = ("f16", "q8_0")
LLAMA_CPP = {"threads": 2, "prompt_tokens": 512, "decode_tokens": 64, "reps": 5}  # as bench.gguf measures


def headline_preset(model: str, fraction: float):
    """The smollm2-demo preset at `fraction` removed, for `model`: what `darwinlm compress` runs."""
    from darwinlm.core.config import load_preset

    return load_preset("smollm2-demo", {"model": model, "search": {"fraction_removed": fraction},
                                        "evaluate": {"tasks": ""}})


def one_shot_view(data):
    """`data` with only the ONE_SHOT_TEXTS' held-out windows, for the reads before post-training."""
    return replace(data, held_out={name: data.held_out[name] for name in ONE_SHOT_TEXTS})


def text_figures(scores: dict, suffix: str = "") -> dict:
    """`ppl_<text><suffix>` and its `_se` from an evaluation's `ppl_<text>` figures (each set is named by its
    text); the rest of the evaluation (KL, windows) is left out."""
    texts = [key.removeprefix("ppl_") for key in scores if key.startswith("ppl_") and not key.endswith("_se")]
    return {figure: value for text in texts for figure, value in (
        (f"ppl_{text}{suffix}", scores[f"ppl_{text}"]), (f"ppl_{text}{suffix}_se", scores[f"ppl_{text}_se"]))}


def seed_mean(rows: list[dict]) -> dict:
    """Each numeric figure's mean over seeds, its population sd as `<key>_sd`, and the per-seed rows."""
    mean = {}
    for key in rows[0]:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and key != "seed"]
        if len(values) == len(rows):
            mean[key] = statistics.fmean(values)
            if len(values) > 1 and not key.endswith("_se") and key != "params_kept":
                mean[f"{key}_sd"] = statistics.pstdev(values)
    return {**mean, "seeds": rows}


class Target:
    """One fraction's shared work (data, database, teachers) and the measurement of any pruned model on it."""

    def __init__(self, fraction: float, model_name: str):
        from darwinlm.core.compression import selection_teacher
        from darwinlm.core.data.prepared import prepare_data
        from darwinlm.core.database.assembly import LiveAssembly
        from darwinlm.core.database.store import build_database
        from darwinlm.core.evaluation.held_out import dense_eval_teacher
        from darwinlm.core.home import data_home
        from darwinlm.core.model.loading import load_model
        from darwinlm.core.search.fitness import compute_teacher
        from darwinlm.core.search.genome import Budget

        self.model_name = model_name
        self.config = headline_preset(model_name, fraction)
        self.model, self.tokenizer = load_model(model_name)
        self.data = prepare_data(self.config.data, self.tokenizer)
        top_k = self.config.teacher_top_k
        self.database = build_database(self.model, self.data.calibration_ids, store_layout.databases(str(data_home())),
                                       calibration_digest=self.data.calibration_digest,
                                       config=self.config.database, progress=True)
        self.fitness_teacher = compute_teacher(self.model, self.data.teacher_pool_ids, top_k)
        self.selection_teacher = selection_teacher(self.config, self.model, self.tokenizer, self.data, progress=True)
        self.eval_teacher = dense_eval_teacher(self.model, self.data, top_k)
        self.post_teacher = compute_teacher(self.model, self.data.post_train_ids, top_k)
        self.one_shot_data = one_shot_view(self.data)
        self.dense_row = {"params_kept": self.database.manifest["dense_params"],
                          **self.evaluate(self.model, every_text=True)}
        self.budget = Budget.from_database(self.database, fraction_removed=fraction, seq_len=self.config.data.seq_len)
        self.assembly = LiveAssembly(self.model, self.database)
        self.scratch = tempfile.TemporaryDirectory(prefix="headline-gguf-")  # removed with the Target
        self.dense_gguf, self.llama_cpp_unsupported = self.convert_dense()

    def convert_dense(self) -> tuple[dict, str | None]:
        """({quant: dense GGUF} by llama.cpp's own converter, as a user has it, None), or ({}, why not)."""
        from bench.gguf import convert_with_llama_cpp
        from darwinlm.core.errors import DarwinLMError
        from darwinlm.core.model.loading import resolve_model_location

        try:
            return convert_with_llama_cpp(Path(resolve_model_location(self.model_name)), Path(self.scratch.name)), None
        except (DarwinLMError, ImportError, subprocess.CalledProcessError) as error:  # the last: no sdist download
            print(f"no llama.cpp figures: {error}", flush=True)
            return {}, f"dense: {error}"

    def llama_cpp_speedups(self, model) -> dict:
        """`model`'s prefill and decode speed in llama.cpp ÷ dense's, timed in the same interleaved rounds."""
        from bench.gguf import llama_cpp_speeds
        from darwinlm.core.errors import DarwinLMError
        from darwinlm.core.export.gguf import export_gguf

        if self.llama_cpp_unsupported:
            return {"llamacpp_unsupported": self.llama_cpp_unsupported}
        with tempfile.TemporaryDirectory(prefix="row-", dir=self.scratch.name) as folder:
            files = {("dense", quant): self.dense_gguf[quant] for quant in LLAMA_CPP_QUANTS}
            try:
                for quant in LLAMA_CPP_QUANTS:
                    files[("row", quant)] = Path(folder) / f"{quant}.gguf"
                    export_gguf(model, self.tokenizer, str(files[("row", quant)]), quant=quant)
            except DarwinLMError as error:  # e.g. FLAP's output bias, which llama.cpp's `deci` graph lacks
                return {"llamacpp_unsupported": str(error)}
            tokens = self.data.calibration_ids.flatten().tolist()  # which tokens does not change the cost
            prompt = tokens[:LLAMA_CPP["prompt_tokens"]]
            decode = tokens[len(prompt):len(prompt) + LLAMA_CPP["decode_tokens"]]
            speed = llama_cpp_speeds(files, prompt, decode, LLAMA_CPP["reps"], LLAMA_CPP["threads"])

        def ratio(kind: str, quant: str) -> float:
            return speed[("row", quant)][kind] / speed[("dense", quant)][kind]

        return {"llamacpp_prefill_speedup_f16": ratio("prefill", "f16"),
                "llamacpp_decode_speedup_f16": ratio("decode", "f16"),
                "llamacpp_prefill_speedup_q8_0": ratio("prefill", "q8_0")}

    def evaluate(self, model, suffix: str = "", every_text: bool = False) -> dict:
        """Test-window figures on ONE_SHOT_TEXTS, or on every text (`every_text`), named with `suffix`."""
        from darwinlm.core.evaluation.held_out import evaluate

        data = self.data if every_text else self.one_shot_data
        return text_figures(evaluate(model, data, self.eval_teacher, split="test"), suffix)

    def search(self, seed: int, start: str | None = None):
        """The pipeline's search at `seed` (its start overridden by `start`), on this target's live assembly."""
        from darwinlm.core.compression import build_search

        search = replace(self.config.search, seed=seed, **({"start": start} if start else {}))
        return build_search(replace(self.config, search=search), self.assembly, self.data, self.fitness_teacher,
                            self.selection_teacher, progress=True)

    def genome_row(self, genome, wall_s: float) -> dict:
        """A genome of the database as selected, then refitted and post-trained as the compress flow does."""
        from darwinlm.core.compression import post_train, refit_weights
        from darwinlm.core.database.refit import RefitDatabase

        self.assembly.apply(genome.assignment(), rebuild=True)
        row = {"params_kept": int(self.budget.cost(genome.levels)), "wall_s": wall_s, **self.evaluate(self.model)}
        start = time.perf_counter()
        if self.config.post_train.refit:
            self.assembly.apply({key: 0 for key in genome.assignment()}, rebuild=True)  # the refit starts dense
            self.assembly.database = RefitDatabase(self.database, refit_weights(
                self.config, self.model, self.database, genome, self.data))
        try:
            post_train(self.assembly, genome, self.data.post_train_ids, self.config, teacher=self.post_teacher,
                       progress=True)
            row["post_train_s"] = time.perf_counter() - start
            row.update(self.evaluate(self.model, "_posttrained", every_text=True))
        finally:
            self.assembly.database = self.database
        return {**row, **self.llama_cpp_speedups(self.model)}

    def peer_row(self, method: str) -> dict:
        """Peer `method` (bench.peers.PEER_METHODS) at this target on a fresh dense model and the database's
        calibration rows, then the same post-training and test windows as darwinlm's rows. ziplm_dp reads this
        target's database (its build, shared with darwinlm's rows, is not in its wall time)."""
        from bench.peers import prune_with
        from darwinlm.core.model.loading import load_model
        from darwinlm.core.search.finetune import finetune

        peer_model, _ = load_model(self.model_name)
        options = {"database": self.database} if method == "ziplm_dp" else {}
        result = prune_with(method, peer_model, self.data.calibration_ids, 1.0 - self.config.search.fraction_removed,
                            **options)
        row = {"params_kept": result.kept_block_params, "wall_s": result.wall_s, **self.evaluate(peer_model)}
        start = time.perf_counter()
        finetune(peer_model, self.data.post_train_ids, self.config.post_train.finetune, teacher=self.post_teacher,
                 progress=True)
        row["post_train_s"] = time.perf_counter() - start
        return {**row, **self.evaluate(peer_model, "_posttrained", every_text=True),
                **self.llama_cpp_speedups(peer_model)}


def run_target(fraction: float, args, rows: dict, save) -> dict:
    """Fill `rows` (method → row) for one fraction, saving as rows arrive; rows already there are kept. Returns
    the record of the held-out windows the rows read."""
    from darwinlm.core.search.genome import Genome

    target = Target(fraction, args.model)
    rows.setdefault("dense", target.dense_row)
    digest = target.database.digest
    if "uniform" not in rows:
        rows["uniform"] = target.genome_row(Genome(target.budget.uniform(), digest), 0.0)
        save()
    if "informed_start" not in rows:
        start = time.perf_counter()
        informed, _ = target.search(0, start="informed").choose_start()
        rows["informed_start"] = target.genome_row(Genome(informed, digest), time.perf_counter() - start)
        save()
    per_seed = rows.get("darwinlm", {}).get("seeds", [])
    for seed in args.seeds:
        if any(row["seed"] == seed for row in per_seed):
            continue
        start = time.perf_counter()
        search = target.search(seed)
        state = search.run()
        row = target.genome_row(search.genome(state), time.perf_counter() - start)
        row.update(seed=seed, generations=state.generation, start=state.start["chosen"],
                   trajectory=[state.history[0]["previous_fixed_kl"]] + [h["fixed_kl"] for h in state.history]
                   if state.history else [state.parent_fixed_kl])
        per_seed.append(row)
        rows["darwinlm"] = seed_mean(per_seed)
        save()
    for name in PEERS:
        if name not in rows and not args.skip_peers:
            rows[name] = target.peer_row(name)
            save()
    return target.data.windows_used("test")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.3",
                        help="fractions of block parameters removed, measured in this order (the demo's 0.5 first, so a "
                             "run stopped part-way has its most-read rows)")
    parser.add_argument("--seeds", default="0,1,2", help="search seeds (the database is shared by all)")
    parser.add_argument("--model", default="smollm2", help="smollm2, or a folder (Gemma: see bench/gemma.py)")
    parser.add_argument("--skip-peers", action="store_true", help="leave out the peers' rows (bench/peers)")
    parser.add_argument("--results", default="headline", help="results name: bench/results/NAME.json")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
        args.targets = [float(target) for target in args.targets.split(",")]
    except ValueError:
        parser.error("--seeds takes integers and --targets fractions, comma-separated (e.g. --targets 0.3,0.5)")
    if not args.seeds or any(not 0 < target < 1 for target in args.targets):
        parser.error("--targets must be fractions strictly between 0 and 1, with at least one --seeds value")
    return args


def main(argv: list[str] | None = None) -> None:
    apply_offline_defaults()
    args = parse_arguments(argv)
    origin = provenance(vars(args), args.seeds)
    run = {"config": origin["config"]}
    earlier = resumable_partial(args.results, run, MEASURED_BY)
    results = {"ood_texts": OOD_TEXTS, "targets": earlier["targets"] if earlier else {}}
    first_origin = earlier["origin"] if earlier else origin

    def save() -> None:  # a long run keeps its rows as they arrive, outside bench/results
        write_partial(args.results, {**results, "run": run, "origin": first_origin})

    windows = None
    for fraction in args.targets:
        rows = results["targets"].setdefault(str(fraction), {})
        windows = run_target(fraction, args, rows, save)
        print_target(str(fraction), rows)
    results["dense"] = next(iter(results["targets"].values()))["dense"]
    results["windows"] = windows  # which held-out windows every row read: the test split, never used to choose
    for rows in results["targets"].values():
        rows.pop("dense")
    resumed = {"resumed_rows_provenance": first_origin} if earlier else {}
    write_results(args.results, {**results, **resumed}, echo=False, origin=origin)


def print_target(key: str, rows: dict) -> None:
    print(f"\ntarget: {float(key):.0%} of block parameters removed (test windows)")
    print(f"{'method':<20}{'params':>12}{'SOTU':>9}{'Moby':>9}{'SOTU post':>11}{'Moby post':>11}{'wall s':>8}")
    for name, row in rows.items():
        shown = [row.get(key) or float("nan") for key in ("ppl_sotu", "ppl_moby", "ppl_sotu_posttrained",
                                                          "ppl_moby_posttrained")]
        print(f"{name:<20}{row['params_kept']:>12,.0f}{shown[0]:>9.2f}{shown[1]:>9.2f}{shown[2]:>11.2f}"
              f"{shown[3]:>11.2f}{row.get('wall_s', 0):>8.0f}")


if __name__ == "__main__":
    main()
