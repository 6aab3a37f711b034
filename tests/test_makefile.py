"""`make bench` is the headline, regenerated in one command: every line carries its estimated minutes, and their
sum is what the two-hour goal is checked against (the Makefile is read as text)."""

import re
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
GOAL_MINUTES = 120
# The headline alone (every method at 30% and 50%, 3 darwinlm seeds, each evaluated before and after the same
# post-training on the test windows) took 92 min for its 50% rows on 2 cores (experiments/2026-12-05-headline-at-50):
# the three darwinlm searches are ~10 min each and every row's refit and post-training ~1-3.5 min. With the four
# other benches the total is over the goal while the default pipeline costs this much on 2 cores. This strict
# xfail turns into a failure the day the estimates meet it, so that the marker goes.
OVER_GOAL = True


def recipe(target: str, makefile: str) -> list[str]:
    """The command lines of one Makefile target."""
    lines = makefile.splitlines()
    start = next(index for index, line in enumerate(lines) if re.match(rf"{re.escape(target)}:", line))
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        commands.append(line.strip())
    return commands


def estimated_minutes(command: str) -> float:
    """The `# ~N min` (or `# ~N h`) estimate a recipe line ends with; a line without one is an error."""
    found = re.search(r"#\s*~(\d+(?:\.\d+)?)\s*(min|h)\b", command)
    if found is None:
        raise ValueError(f"no '# ~N min' estimate on: {command}")
    return float(found.group(1)) * (60 if found.group(2) == "h" else 1)


def test_estimates_are_read_from_each_line():
    assert estimated_minutes("python -m bench.x   # ~40 min: what") == 40
    assert estimated_minutes("python -m bench.x   # ~1.5 h: what") == 90
    with pytest.raises(ValueError, match="no '# ~N min' estimate"):
        estimated_minutes("python -m bench.x   # what")


def test_every_bench_line_is_a_python_bench_with_an_estimate():
    commands = recipe("bench", MAKEFILE.read_text())
    assert commands and all(command.startswith(".venv/bin/python -m bench.") for command in commands)
    assert all(estimated_minutes(command) > 0 for command in commands)
    modules = [command.split()[2] for command in commands]
    assert "bench.headline" in modules and modules[-1] == "bench.report"  # the report reads what the rest wrote


@pytest.mark.xfail(OVER_GOAL, strict=True, reason="the headline bench is estimated over its two hours (issue 37)")
def test_the_headline_bench_is_estimated_within_two_hours():
    total = sum(estimated_minutes(command) for command in recipe("bench", MAKEFILE.read_text()))
    assert total <= GOAL_MINUTES, f"make bench is estimated at {total:.0f} min"
