"""bench.report: docs/results.md and its plots come from the results files, in either row shape."""

import json
from pathlib import Path

import pytest

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
    assert "| 50% | darwinlm | 50 | 70.0 ± 2.0 | 250.0 ± 9.0 | 55.0 ± 0.7 | 200.0 ± 8.0 | 10 | – |" in text
    assert "| 0% | dense | 100 | 25.0 | 60.0 | – | – | – | – |" in text and "commit `aaaaaaaaaaaa`" in text
    for name in ("ppl_vs_fraction.png", "quality_vs_speed.png", "search_trajectory.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 1000 and f"]({name})" in text


def test_the_page_has_a_column_for_every_out_of_domain_text_and_the_readme_keeps_two(tmp_path):
    headline_file(tmp_path)
    headline = json.loads((tmp_path / "headline.json").read_text())
    headline["ood_texts"] = ["moby", "email"]
    headline["dense"]["ppl_email"] = 40.0
    headline["targets"]["0.5"]["darwinlm"].update(ppl_email=300.0, ppl_email_posttrained=250.0)
    headline["targets"]["0.5"]["uniform"].update(ppl_email=500.0, ppl_email_posttrained=350.0)
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    text = report.write_report(tmp_path, tmp_path / "docs").read_text()
    # e-mail is read after post-training only (bench.headline): no one-shot column, its dense figure said apart
    assert "| ppl_sotu | ppl_moby | ppl_sotu_posttrained | ppl_moby_posttrained | ppl_email_posttrained |" in text
    assert "| 0% | dense | 100 | 25.0 | 60.0 | – | – | – | – | – |" in text
    assert "Dense on the texts read only after post-training: e-mail 40.0." in text
    assert " 300.0 | " not in text and "| 50% | darwinlm | 50 | 70.0 ± 2.0 | 250.0 ± 9.0 | 55.0 ± 0.7 | " in text
    assert "| 50% | uniform | 1.00× noise | 1.00× noise | 0.92× win | 1.00× noise | 0.71× |" in text
    readme = report.readme_table(headline, "bench/results/headline.json")
    assert "e-mail" not in "\n".join(readme) and "Moby-Dick, post-trained" in readme[2]


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


def peer_rows():
    """darwinlm against three peers: one it beats beyond the noise, one within it, one that beats it."""
    darwinlm = {"ppl_sotu_posttrained": 50.0, "ppl_sotu_posttrained_se": 1.0, "ppl_sotu_posttrained_sd": 1.0}
    return {"darwinlm": darwinlm,
            "flap": {"ppl_sotu_posttrained": 60.0, "ppl_sotu_posttrained_se": 1.0},  # 10 > 2 × √3
            "slimgpt": {"ppl_sotu_posttrained": 52.0, "ppl_sotu_posttrained_se": 1.0},  # 2 < 2 × √3
            "shortgpt": {"ppl_sotu_posttrained": 45.0, "ppl_sotu_posttrained_se": 1.0}}


def test_a_resumed_headline_names_the_commit_of_the_rows_it_resumed_too():
    headline = {"provenance": {"commit": "a" * 40}}
    assert report.measured_at(headline) == f"commit `{'a' * 12}`"
    resumed = {**headline, "resumed_rows_provenance": {"commit": "b" * 40, "date": "2026-12-05T01:05:07+00:00"}}
    assert f"commit `{'a' * 12}`" in report.measured_at(resumed)
    assert f"commit `{'b' * 12}` on 2026-12-05T01:05:07+00:00" in report.measured_at(resumed)


def test_a_difference_counts_only_beyond_twice_the_combined_noise():
    rows = peer_rows()
    assert report.verdict(rows["darwinlm"], rows["flap"], "ppl_sotu_posttrained") == "0.83× win"
    assert report.verdict(rows["darwinlm"], rows["slimgpt"], "ppl_sotu_posttrained") == "0.96× noise"
    assert report.verdict(rows["darwinlm"], rows["shortgpt"], "ppl_sotu_posttrained") == "1.11× loss"
    assert report.verdict(rows["darwinlm"], rows["flap"], "ppl_moby") == "–"
    assert report.verdict(rows["darwinlm"], {"ppl_sotu_posttrained": 60.0}, "ppl_sotu_posttrained") == "0.83×"


def test_the_best_peer_is_the_lowest_post_trained_in_domain_perplexity():
    rows = peer_rows()
    assert report.best_peer(rows) == "shortgpt"
    assert report.best_peer({"darwinlm": rows["darwinlm"], "uniform": rows["flap"]}) is None


def test_the_readme_table_is_rewritten_between_its_markers_and_nothing_else(tmp_path):
    headline_file(tmp_path)
    headline, _ = report.load_headline(tmp_path)
    headline["targets"]["0.5"]["flap"] = {**headline["targets"]["0.5"]["uniform"], "ppl_sotu_posttrained": 58.0}
    begin, end = report.README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n{begin}\nold table\n{end}\nafter\n")
    report.update_readme(readme, headline, "`x.json`")
    text = readme.read_text()
    assert text.startswith(f"# intro\n{begin}\nFrom `x.json` at commit `aaaaaaaaaaaa`") and text.endswith(f"{end}\nafter\n")
    assert "old table" not in text and "| 50% | FLAP (best peer) | 70.0 ± 2.0 | 250.0 ± 9.0 | 58.0 ± 1.5 |" in text
    report.update_readme(readme, headline, "`x.json`")
    assert readme.read_text() == text  # idempotent


def test_a_readme_without_its_markers_stops_with_one_line_and_is_left_alone(tmp_path):
    headline_file(tmp_path)
    headline, _ = report.load_headline(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="needs the two lines"):
        report.update_readme(readme, headline, "`x.json`")
    assert readme.read_text() == "# no markers\n"


def test_the_committed_readme_table_is_what_the_committed_results_give():
    """A hand edit of the README's figures, or a results file committed without `python -m bench.report`, fails."""
    repository = Path(report.__file__).parents[1]
    headline, _ = report.load_headline(report.RESULTS)
    source = f"`bench/results/{report.headline_source(report.RESULTS).name}`"
    begin, end = report.README_MARKERS
    committed = (repository / "README.md").read_text().split(begin)[1].split(end)[0]
    assert committed.strip("\n").splitlines() == report.readme_table(headline, source)
