"""What a search generation's record becomes in MLflow: the figures a user watches, and nothing that cannot
be plotted."""

from darwinlm.tasks.tracking import generation_metrics


def record(**extra) -> dict:
    return {"generation": 3, "fixed_kl": 0.8, "best_fitness": 0.7, "acceptance_rate": 0.2, "move_size": 2,
            "kept": 100, "evaluations": 9, "wall_s": 1.0, "compute_s": 0.9, "paired_z": -1.5,
            "stages": [{"best": 0.7, "median": 0.9, "candidates": 6}], **extra}


def test_a_plain_generation_logs_its_trajectory_and_decision_only():
    metrics = generation_metrics(record())
    assert metrics["fixed_kl"] == 0.8 and metrics["paired_z"] == -1.5 and metrics["stage0_median"] == 0.9
    assert not {"informed_won", "informed_moved", "confirmation_upheld"} & set(metrics)


def test_an_informed_step_and_a_confirmation_are_logged_when_they_happened():
    metrics = generation_metrics(record(informed={"moved": 12, "won": True, "wall_s": 3.0},
                                        confirmation={"rows": 3, "paired_z": -0.4, "upheld": False}))
    assert (metrics["informed_won"], metrics["informed_moved"], metrics["confirmation_upheld"]) == (1.0, 12, 0.0)


def test_an_unbounded_z_is_not_logged():  # two identical genomes on rows with no spread: ±inf cannot be plotted
    assert "paired_z" not in generation_metrics(record(paired_z=float("-inf")))
    assert "paired_z" not in generation_metrics(record(paired_z=None))
