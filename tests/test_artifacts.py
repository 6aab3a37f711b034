"""What a compression leaves in the Prefect UI's Artifacts tab, checked without a server: keys per run, and a
greedy sample that reads at any width."""

from darwinlm.flows.artifacts import artifact_key, greedy_sample_markdown, run_prefix


def test_keys_are_per_run():
    first, second = run_prefix("smollm2", "3f2a9c1b07de55aa"), run_prefix("smollm2", "0a2a9c1b07de55aa")
    assert first != second and artifact_key(first, "search-progress") == "smollm2-3f2a9c1b07de-search-progress"


def test_the_greedy_sample_stacks_prompt_dense_and_pruned_as_wrapping_prose():
    text = greedy_sample_markdown({"prompt": "to the | House", "dense": "of Representatives\nand",
                                   "pruned": "to the House of the Senate, and to the House of the Senate"})
    assert "|---" not in text and "\\|" in text  # no table whose columns could be cut off; pipes kept literal
    assert text.index("Prompt") < text.index("Dense") < text.index("Pruned")
    assert "> of Representatives and" in text  # one paragraph each, wrapped by the viewer
