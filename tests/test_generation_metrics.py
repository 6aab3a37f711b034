"""What a search generation's record becomes in MLflow: the figures a user watches, and nothing that cannot
be plotted."""

from darwinlm.tasks.tracking import generation_metrics


def record(**extra) -> dict:
    return {"generation": 3, "fixed_kl": 0.8, "best_fitness": 0.7, "acceptance_rate": 0.2, "move_size": 2,
            "kept": 100, "evaluations": 9, "wall_s": 1.0, "compute_s": 0.9, "paired_z": -1.5,
            "stages": [{"best": 0.7, "median": 0.9, "candidates": 6}], **extra}


def test_a_generation_logs_its_trajectory_decision_and_stages():
    metrics = generation_metrics(record(accepted=True))
    assert metrics == {"fixed_kl": 0.8, "best_fitness": 0.7, "acceptance_rate": 0.2, "move_size": 2, "kept": 100,
                       "evaluations": 9, "wall_s": 1.0, "compute_s": 0.9, "accepted": 1.0, "paired_z": -1.5,
                       "stage0_best": 0.7, "stage0_median": 0.9}


def test_a_kept_parent_logs_accepted_zero():
    assert generation_metrics(record(accepted=False))["accepted"] == 0.0


def test_an_unbounded_z_is_not_logged():  # two identical genomes on rows with no spread: ±inf cannot be plotted
    assert "paired_z" not in generation_metrics(record(paired_z=float("-inf")))
    assert "paired_z" not in generation_metrics(record(paired_z=None))
