"""bench.report: docs/results.md and its plots come from the results files, in either row shape."""

import json

from bench import report


def headline_file(tmp_path):
    row = {"params_kept": 50, "wall_s": 10.0, "ppl_sotu": 70.0, "ppl_sotu_se": 2.0, "ppl_moby": 250.0,
           "ppl_moby_se": 9.0, "ppl_sotu_posttrained": 60.0, "ppl_sotu_posttrained_se": 1.5,
           "ppl_moby_posttrained": 200.0, "ppl_moby_posttrained_se": 8.0}
    darwinlm = {**row, "ppl_sotu_posttrained": 55.0, "ppl_sotu_posttrained_sd": 0.7,
                "seeds": [{"seed": 0, "trajectory": [0.9, 0.85, 0.8]}, {"seed": 1, "trajectory": [0.9, 0.88]}]}
    headline = {"ood_texts": ["moby"], "dense": {"params_kept": 100, "ppl_sotu": 25.0, "ppl_moby": 60.0},
                "targets": {"0.5": {"uniform": row, "darwinlm": darwinlm}},
                "provenance": {"commit": "a" * 40, "date": "2026-12-04", "command": "python -m bench.headline"}}
    (tmp_path / "headline.json").write_text(json.dumps(headline))


def test_the_page_holds_the_table_and_three_plots(tmp_path):
    headline_file(tmp_path)
    page = report.write_report(tmp_path, tmp_path / "docs")
    text = page.read_text()
    assert "| 50% | darwinlm | 50 | 70.0 ± 2.0 | 250.0 ± 9.0 | 55.0 ± 0.7 | 200.0 ± 8.0 |" in text
    assert "| 0% | dense | 100 | 25.0 | 60.0 | – | – |" in text and "commit `aaaaaaaaaaaa`" in text
    for name in ("ppl_vs_fraction.png", "quality_vs_speed.png", "search_trajectory.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 1000 and f"]({name})" in text


def test_the_last_search_bench_s_rows_take_the_headline_shape():
    search = {"provenance": {}, "targets": {"0.5": {
        "dense": {"params": 100, "ppl_sotu": 25.0, "ppl_moby": 60.0},
        "darwinlm_oneshot": {"params": 50, "ppl_sotu": 70.0, "ppl_sotu_sd": 1.0, "ppl_moby": 250.0, "seeds": []},
        "darwinlm_oneshot_posttrained": {"params": 50, "ppl_sotu": 60.0, "ppl_sotu_se": 2.0, "ppl_moby": 200.0},
        "decision_noise": {}}}}
    shaped = report.headline_from_search(search)
    assert shaped["dense"] == {"params_kept": 100, "ppl_sotu": 25.0, "ppl_moby": 60.0}
    assert shaped["targets"]["0.5"] == {"darwinlm": {
        "params_kept": 50, "wall_s": None, "seeds": [], "ppl_sotu": 70.0, "ppl_sotu_sd": 1.0,
        "ppl_sotu_posttrained": 60.0, "ppl_sotu_posttrained_se": 2.0, "ppl_moby": 250.0,
        "ppl_moby_posttrained": 200.0}}


def test_before_the_headline_has_llama_cpp_speed_the_plot_reads_gguf_json_alone(tmp_path):
    headline_file(tmp_path)
    headline, _ = report.load_headline(tmp_path)
    f16 = {"dense": {"ppl": 26.0}, "pruned": {"ppl": 60.0}, "uniform": {"ppl": 128.0}}
    gguf = {"prefill_speedup_f16": 1.7, "uniform_prefill_speedup_f16": 2.0, "per_quant": {"f16": f16}}
    plot = report.plot_quality_against_speed(headline, gguf, tmp_path)
    from matplotlib import pyplot

    axis_points = sorted(tuple(points.get_offsets()[0]) for points in pyplot.gcf().axes[0].collections)
    assert plot.stat().st_size > 1000 and axis_points == [(1.0, 26.0), (1.7, 60.0), (2.0, 128.0)]
