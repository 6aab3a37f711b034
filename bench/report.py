"""docs/results.md, its plots and the README's results table, generated from the results files (never edited by
hand).

    python -m bench.report [--out docs] [--readme README.md]

Reads bench/results/headline.json, or, until `make bench` has written one, the last search bench's
bench/results/search.json (the same methods in its older row shape, on the old contiguous held-out windows: the
page says which it read), plus bench/results/gguf.json for llama.cpp speed. Writes docs/results.md with the
headline table (value ± standard error over windows; ± the spread over seeds for darwinlm) and three PNGs:
perplexity against the fraction removed per method, quality against llama.cpp prefill speed, and the search's
fixed-row KL trajectory per seed. The page also sets darwinlm against every other method (against_peers), and the
README's table between its two README_MARKERS is rewritten with dense, uniform, darwinlm and the best peer.
"""

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("uniform", "informed_start", "darwinlm", "tp_taylor_uniform", "tp_global", "flap", "slimgpt", "ziplm_dp",
           "shortgpt", "wanda_sp")  # bench.headline.PEERS after darwinlm's own rows
PEERS = METHODS[3:]
PEER_LABELS = {"tp_taylor_uniform": "torch-pruning, Taylor uniform", "tp_global": "torch-pruning, Taylor global",
               "flap": "FLAP", "slimgpt": "SlimGPT", "ziplm_dp": "ZipLM-DP", "shortgpt": "ShortGPT",
               "wanda_sp": "Wanda-sp"}
# The README's table shows the in-domain text and Moby-Dick, the out-of-domain text results are reported on
# first; the page shows every text a headline lists (texts_of).
README_TEXTS = ("sotu", "moby")
TEXT_LABELS = {"sotu": "SOTU", "moby": "Moby-Dick", "email": "e-mail", "npm_docs": "npm manual"}
# A difference counts as a win or a loss only beyond this many of its noise (see noise()): about 95% two-sided.
NOISE_MULTIPLE = 2.0
README_MARKERS = ("<!-- results table: written by `python -m bench.report`, do not edit -->",
                  "<!-- end of results table -->")
# search.json's method names, for a page generated before the first headline run
OLD_NAMES = {"darwinlm_oneshot": "darwinlm"}


def headline_from_search(search: dict) -> dict:
    """search.json's rows in headline.json's shape: `X` and `X_posttrained` rows become one row with
    `_posttrained` keys; `params` becomes `params_kept`."""
    targets = {}
    for fraction, rows in search["targets"].items():
        shaped = {}
        for name, row in rows.items():
            method = OLD_NAMES.get(name, name)
            if method not in METHODS:
                continue
            after = rows.get(f"{name}_posttrained", {})
            shaped[method] = {"params_kept": row.get("params"), "wall_s": row.get("wall_s"),
                              "seeds": row.get("seeds", [])}
            for text in README_TEXTS:
                for suffix, source in (("", row), ("_posttrained", after)):
                    for tail in ("", "_se", "_sd"):
                        if f"ppl_{text}{tail}" in source:
                            shaped[method][f"ppl_{text}{suffix}{tail}"] = source[f"ppl_{text}{tail}"]
        targets[fraction] = shaped
    dense = next(iter(search["targets"].values()))["dense"]
    return {"targets": targets, "ood_texts": ["moby"], "provenance": search["provenance"],
            "dense": {"params_kept": dense["params"], **{f"ppl_{t}": dense[f"ppl_{t}"] for t in README_TEXTS}}}


def texts_of(headline: dict) -> tuple[str, ...]:
    """The texts a headline measured: the in-domain one, then its `ood_texts`."""
    return ("sotu", *headline["ood_texts"])


def columns(texts: tuple[str, ...]) -> list[str]:
    """Perplexity columns: before post-training on the README's texts (bench.headline reads the others only
    after it), then after post-training on every text of `texts`."""
    return [f"ppl_{text}" for text in texts if text in README_TEXTS] + [f"ppl_{text}_posttrained" for text in texts]


def headline_source(results: Path) -> Path:
    """The file the headline is read from: headline.json, else (before the first `make bench`) search.json."""
    for name in ("headline.json", "search.json"):
        if (results / name).exists():
            return results / name
    raise SystemExit("bench.report: no bench/results/headline.json (or search.json): run `make bench` first")


def load_headline(results: Path) -> tuple[dict, str]:
    path = headline_source(results)
    if path.name == "headline.json":
        return json.loads(path.read_text()), "bench/results/headline.json (test windows)"
    return headline_from_search(json.loads(path.read_text())), (
        "bench/results/search.json: the last search bench, on the old contiguous held-out windows, until "
        "`make bench` writes headline.json")


def cell(row: dict, key: str) -> str:
    """`value ± error`: the seed spread where there are seeds, else the window standard error."""
    if row.get(key) is None:
        return "–"
    error = row.get(f"{key}_sd", row.get(f"{key}_se"))
    return f"{row[key]:.1f}" + (f" ± {error:.1f}" if error is not None else "")


def seconds(row: dict) -> str:
    """The method's own work up to the pruned model, and its post-training, in seconds."""
    shown = [f"{row[key]:.0f}" if row.get(key) is not None else "–" for key in ("wall_s", "post_train_s")]
    return " | ".join(shown)


def table(headline: dict) -> list[str]:
    texts = texts_of(headline)
    keys = columns(texts)
    dense = headline["dense"]
    only_after = [text for text in texts if text not in README_TEXTS and dense.get(f"ppl_{text}") is not None]
    lines = ["Dense on the texts read only after post-training: "
             + ", ".join(f"{TEXT_LABELS.get(t, t)} {cell(dense, f'ppl_{t}')}" for t in only_after) + ".", ""
             ] if only_after else []
    lines += ["| removed | method | params kept | " + " | ".join(keys) + " | method s | post-training s |",
              "|---|---|---|" + "---|" * (len(keys) + 2)]
    lines.append(f"| 0% | dense | {dense['params_kept']:,} | "
                 + " | ".join(cell(dense, key) if key in dense else "–" for key in keys) + " | – | – |")
    for fraction, rows in sorted(headline["targets"].items()):
        for method in METHODS:
            if method in rows:
                row = rows[method]
                lines.append(f"| {float(fraction):.0%} | {method} | {row['params_kept']:,.0f} | "
                             + " | ".join(cell(row, column) for column in keys) + f" | {seconds(row)} |")
    return lines


def noise(row: dict, key: str) -> float:
    """One row's uncertainty in `key`: its window standard error and, for a seeded row, its spread over seeds."""
    return math.hypot(row.get(f"{key}_se") or 0.0, row.get(f"{key}_sd") or 0.0)


def verdict(ours: dict, peer: dict, key: str) -> str:
    """`ratio× outcome` of darwinlm's `key` against a peer's: a win or a loss when the difference exceeds
    NOISE_MULTIPLE × the two rows' noise combined, else noise. The rows read the same windows, so their window
    errors are partly shared and this unpaired combination is conservative. Just the ratio where a row records no
    error."""
    if ours.get(key) is None or peer.get(key) is None:
        return "–"
    ratio = f"{ours[key] / peer[key]:.2f}×"
    if not all(row.get(f"{key}_se") is not None or row.get(f"{key}_sd") is not None for row in (ours, peer)):
        return ratio  # a row without its error (search.json's older rows): no verdict
    difference = peer[key] - ours[key]
    margin = NOISE_MULTIPLE * math.hypot(noise(ours, key), noise(peer, key))
    outcome = "win" if difference > margin else "loss" if -difference > margin else "noise"
    return f"{ratio} {outcome}"


def against_peers(headline: dict) -> list[str]:
    """darwinlm's perplexity ÷ each peer's, per fraction, text and stage, with whether it is beyond the noise."""
    keys = columns(texts_of(headline))
    lines = ["| removed | darwinlm against | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for fraction, rows in sorted(headline["targets"].items()):
        if "darwinlm" not in rows:
            continue
        for method in ("uniform", "informed_start", *PEERS):
            if method in rows:
                lines.append(f"| {float(fraction):.0%} | {method} | "
                             + " | ".join(verdict(rows["darwinlm"], rows[method], key) for key in keys) + " |")
    return lines


def best_peer(rows: dict) -> str | None:
    """The peer a user would pick: the lowest in-domain perplexity after post-training (what ships is
    post-trained)."""
    scored = [method for method in PEERS if (rows.get(method) or {}).get("ppl_sotu_posttrained") is not None]
    return min(scored, key=lambda method: rows[method]["ppl_sotu_posttrained"], default=None)


def measured_at(headline: dict) -> str:
    """The commit a headline names, and, when the run resumed rows an earlier run of the same measured code saved
    (bench.headline refuses them otherwise), that run's commit too: each row was measured at one of the two."""
    text = f"commit `{headline['provenance'].get('commit', '?')[:12]}`"
    resumed = headline.get("resumed_rows_provenance")
    if resumed:
        text += (f" (resuming the rows a stopped run saved at commit `{resumed.get('commit', '?')[:12]}` on "
                 f"{resumed.get('date', '?')}, with the measured code unchanged)")
    return text


def readme_table(headline: dict, source: str) -> list[str]:
    """The README's one table: dense, then uniform, darwinlm and the best peer at each fraction."""
    lines = [f"From {source} at {measured_at(headline)}; ± is the window standard "
             "error, or for darwinlm the spread over its seeds.", "",
             "| removed | method | " + " | ".join(f"{TEXT_LABELS[t]}{s}" for s in ("", ", post-trained")
                                                 for t in README_TEXTS) + " |",
             "|---|---|" + "---|" * len(columns(README_TEXTS)),
             "| 0% | dense | " + " | ".join(cell(headline["dense"], f"ppl_{t}") for t in README_TEXTS) + " | – | – |"]
    for fraction, rows in sorted(headline["targets"].items()):
        peer = best_peer(rows)
        shown = [("uniform", "uniform"), ("darwinlm", "**darwinlm**")]
        shown += [(peer, f"{PEER_LABELS[peer]} (best peer)")] if peer else []
        for method, label in shown:
            if method in rows:
                lines.append(f"| {float(fraction):.0%} | {label} | "
                             + " | ".join(cell(rows[method], key) for key in columns(README_TEXTS)) + " |")
    return lines


def update_readme(readme: Path, headline: dict, source: str) -> None:
    """Rewrite the README's lines between README_MARKERS with readme_table (temporary file, then rename)."""
    text = readme.read_text()
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"bench.report: {readme} needs the two lines {begin!r} and {end!r}, once each and in "
                         "that order, around its results table")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    temporary = readme.with_suffix(".tmp")
    temporary.write_text(head + begin + "\n" + "\n".join(readme_table(headline, source)) + "\n" + end + tail)
    temporary.replace(readme)


def plot_ppl_against_fraction(headline: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = texts_of(headline)
    figure, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    axes = axes[0]
    for axis, text in zip(axes, texts):
        for method in METHODS:
            points = sorted((float(f), rows[method]) for f, rows in headline["targets"].items() if method in rows)
            key = f"ppl_{text}_posttrained"
            points = [(f, row) for f, row in points if row.get(key)]
            if points:
                axis.errorbar([f for f, _ in points], [row[key] for _, row in points], marker="o", capsize=3,
                              yerr=[row.get(f"{key}_sd", row.get(f"{key}_se")) or 0 for _, row in points],
                              label=method)
        axis.axhline(headline["dense"][f"ppl_{text}"], color="grey", linestyle=":", label="dense")
        axis.set(yscale="log", xlabel="fraction of block parameters removed", ylabel="perplexity (post-trained)",
                 title=text)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle("Perplexity after post-training, per method")
    return save(figure, out / "ppl_vs_fraction.png")


def plot_quality_against_speed(headline: dict, gguf: dict | None, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    points = [(1.0, headline["dense"]["ppl_sotu"], "dense")]
    for fraction, rows in headline["targets"].items():
        for method, row in rows.items():
            if row.get("llamacpp_prefill_speedup_f16") and row.get("ppl_sotu_posttrained"):
                points.append((row["llamacpp_prefill_speedup_f16"], row["ppl_sotu_posttrained"],
                               f"{method} {float(fraction):.0%}"))
    if gguf and len(points) == 1:  # before the headline carries llama.cpp speed: gguf.json's models, its windows
        f16 = gguf["per_quant"]["f16"]
        points = [(1.0, f16["dense"]["ppl"], "dense"),
                  (gguf["prefill_speedup_f16"], f16["pruned"]["ppl"], "what make demo ships, 50%")]
        if "uniform" in f16:
            points.append((gguf["uniform_prefill_speedup_f16"], f16["uniform"]["ppl"], "uniform 50%, one-shot"))
    for speed, ppl, label in points:
        axis.scatter(speed, ppl)
        axis.annotate(label, (speed, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set(yscale="log", xlabel="llama.cpp f16 prefill speed ÷ dense", ylabel="perplexity, State of the Union",
             title="Quality against llama.cpp prefill speed", xlim=(0.9, max(speed for speed, _, _ in points) + 0.4))
    return save(figure, out / "quality_vs_speed.png")


def plot_trajectory(headline: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for fraction, rows in sorted(headline["targets"].items()):
        for seed_row in rows.get("darwinlm", {}).get("seeds", []):
            if seed_row.get("trajectory"):
                axis.plot(seed_row["trajectory"], label=f"{float(fraction):.0%} removed, seed {seed_row['seed']}")
    axis.set(xlabel="generation (0: the start)", ylabel="parent's KL on the fixed rows",
             title="The search's fixed-row KL trajectory")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return save(figure, out / "search_trajectory.png")


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_report(results: Path, out: Path, readme: Path | None = None) -> Path:
    """docs/results.md and its plots under `out`; the README's results table too when `readme` is given."""
    headline, source = load_headline(results)
    gguf_path = results / "gguf.json"
    gguf = json.loads(gguf_path.read_text()) if gguf_path.exists() else None
    plots = [plot_ppl_against_fraction(headline, out), plot_quality_against_speed(headline, gguf, out),
             plot_trajectory(headline, out)]
    origin = headline["provenance"]
    lines = ["# darwinlm results", "",
             f"Generated by `python -m bench.report` from {source}, measured by `{origin['command']}` at "
             f"{measured_at(headline)}; the run that wrote it started {origin['date']}. Perplexity on 512-token windows; ± is the window "
             "standard error, or for darwinlm the spread (sd) over its seeds. `method s` is the method's own work up "
             "to the pruned model (darwinlm's database, shared by its rows, is not in it); `post-training s` "
             "includes the refit of the genomes from darwinlm's database (uniform, informed_start, darwinlm).", "", *table(headline), "",
             "## darwinlm against each method", "",
             "darwinlm's perplexity ÷ the method's (below 1: darwinlm is better). `win` or `loss` only where the "
             f"difference exceeds {NOISE_MULTIPLE:g} × the combined noise of the two rows (window standard errors "
             "and darwinlm's spread over seeds); otherwise `noise`.", "", *against_peers(headline), ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    page = out / "results.md"
    temporary = page.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(page)
    if readme is not None:
        update_readme(readme, headline, f"`bench/results/{headline_source(results).name}`")
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs"))
    parser.add_argument("--readme", default=str(Path(__file__).parent.parent / "README.md"),
                        help="the README whose results table to rewrite ('' to leave it)")
    args = parser.parse_args(argv)
    print(f"wrote {write_report(RESULTS, Path(args.out), Path(args.readme) if args.readme else None)}")


if __name__ == "__main__":
    main()
