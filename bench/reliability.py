"""Reliability and security campaigns, counted: crashes, storage faults, bad inputs, concurrency, credentials.

    python -m bench.reliability [--crash-trials 20] [--seed 0]

Writes bench/results/reliability.json with crash_trials, crash_resumed, finished_stages_rerun,
corrupted_artifacts, result_mismatches, storage_faults_injected, storage_faults_recovered, bad_inputs_tried,
bad_inputs_clean_error, credential_leaks (plus a few details). Everything runs on the tiny preset through a
temporary Prefect server and a moto S3 server on 127.0.0.1; about 15 minutes on 2 cores.
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from tests.support import crash_campaign as campaign
from tests.support.credentials import SENTINELS, credential_leaks
from bench.results_file import provenance, write_partial, write_results
from darwinlm.flows.offline import apply_offline_defaults


def crash_campaign(trials: int, seed: int, api_url: str, scratch: Path) -> dict:
    """Kill -9 at a named point (database, search, export, register) or after a random delay, then re-run."""
    rng = random.Random(seed)
    reference_root = campaign.make_workspace(scratch / "reference")
    started = time.perf_counter()
    code, summary, _ = campaign.run_child(campaign.parameters(reference_root), campaign.child_env(reference_root, api_url))
    full_s = time.perf_counter() - started
    reference = campaign.fingerprint(summary["run_uri"])
    points = sorted(campaign.KILL_POINTS)
    counts = {"crash_trials": 0, "crash_resumed": 0, "finished_stages_rerun": 0, "corrupted_artifacts": 0,
              "stale_temporaries": 0, "result_mismatches": 0, "killed_before_finishing": 0}
    details = []
    for trial in range(trials):
        root = campaign.make_workspace(scratch / f"trial-{trial:02d}")
        env = campaign.child_env(root, api_url)
        # even trials among the first 2×points kill at each named point once; all others at a random moment
        point = points[trial // 2] if trial < 2 * len(points) and trial % 2 == 0 else None
        delay = None if point else rng.uniform(0.1, full_s)
        code, _, _ = campaign.run_child(campaign.parameters(root), env, kill_point=point, kill_after_s=delay)
        counts["crash_trials"] += 1
        counts["killed_before_finishing"] += code != 0
        before = campaign.stage_markers(root / "store")
        code, summary, work = campaign.run_child(campaign.parameters(root), env)
        rerun = campaign.rerun_stages(before, campaign.stage_markers(root / "store"))
        versions = campaign.registered_versions(env["MLFLOW_TRACKING_URI"], summary["registered_model"])
        problems = campaign.artifact_problems(root / "store")
        stale = [p for p in problems if p.startswith("stale temporary")]
        mismatch = campaign.fingerprint(summary["run_uri"]) != reference
        counts["crash_resumed"] += code == 0
        counts["finished_stages_rerun"] += len(rerun) + max(0, versions - 1)
        counts["corrupted_artifacts"] += len(problems) - len(stale)
        counts["stale_temporaries"] += len(stale)
        counts["result_mismatches"] += mismatch
        details.append({"trial": trial, "kill": point or f"after {delay:.1f} s", "rerun": rerun,
                        "versions": versions, "problems": problems, "mismatch": mismatch, "work": work})
        print(f"crash trial {trial}: kill {details[-1]['kill']}, re-ran {rerun or 'nothing finished'}, "
              f"problems {problems or 'none'}, {'MISMATCH' if mismatch else 'same result'}", flush=True)
    return {**counts, "uninterrupted_s": full_s, "crash_details": details}


def storage_campaign(scratch: Path) -> dict:
    """Database builds and exports on a moto bucket under transient faults and stalls, then a dead store."""
    import fsspec

    from tests.support.storage_faults import StorageFaults, moto_s3
    from darwinlm.core.database.store import DatabaseConfig, build_database
    from darwinlm.core.errors import DarwinLMError
    from tests.support.tiny_models import random_token_rows, tiny_model

    rows, config = random_token_rows(128, 8, 16), DatabaseConfig(level_steps=3)
    result = {"storage_faults_injected": 0, "storage_faults_recovered": 0, "storage_permanent_clear_error": 0,
              "storage_visible_without_manifest": 0}
    with moto_s3():
        s3 = fsspec.core.url_to_fs("s3://darwinlm/x")[0]
        for seed in range(3):
            model = tiny_model("llama", seed=seed)
            local = build_database(model, rows, str(scratch / "local"), calibration_digest="c", config=config)
            with StorageFaults(s3, rate=0.3, slow_rate=0.1, seed=seed) as faults:
                remote = build_database(model, rows, "s3://darwinlm/faulty", calibration_digest="c", config=config)
                for module in remote.manifest["modules"]:
                    for level in range(1, len(module["levels"])):
                        remote.load(module["layer"], module["kind"], level)
            result["storage_faults_injected"] += faults.injected
            result["storage_faults_recovered"] += faults.injected if remote.manifest == local.manifest else 0
        model = tiny_model("llama", seed=9)
        with StorageFaults(s3, permanent=True, methods=("pipe_file",)):
            try:
                build_database(model, rows, "s3://darwinlm/dead", calibration_digest="c", config=config)
            except DarwinLMError as error:
                result["storage_permanent_clear_error"] += "\n" not in str(error)
        result["storage_visible_without_manifest"] = sum(
            1 for path in s3.find("darwinlm/dead") if not path.endswith(".lock"))
    return result


def bad_input_campaign(scratch: Path) -> dict:
    import pytest

    from tests.support.bad_inputs import CASES, run_case

    clean, failures = 0, []
    for case in CASES:
        with pytest.MonkeyPatch.context() as patch:
            outcome = run_case(case, scratch / case.name, patch)
        if outcome["clean_error"] and not outcome["wrote"]:
            clean += 1
        else:
            failures.append(outcome)
    return {"bad_inputs_tried": len(CASES), "bad_inputs_clean_error": clean, "bad_input_failures": failures}


def credential_campaign(scratch: Path) -> dict:
    import contextlib
    import io

    import fsspec
    import pytest
    import s3fs

    from tests.support.storage_faults import moto_s3
    from darwinlm.flows.compress import CompressParameters, compress

    workspace = campaign.make_workspace(scratch / "credentials")
    with moto_s3() as endpoint, pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", SENTINELS["key"])
        patch.setenv("AWS_SECRET_ACCESS_KEY", SENTINELS["secret"])
        patch.setitem(fsspec.config.conf, "s3", {**SENTINELS, "client_kwargs": {"endpoint_url": endpoint}})
        s3fs.S3FileSystem.clear_instance_cache()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            compress(CompressParameters(**campaign.parameters(workspace, store="s3://darwinlm/secure")))
        leaks = credential_leaks(SENTINELS, "s3://darwinlm/secure", [out.getvalue(), err.getvalue()])
        s3fs.S3FileSystem.clear_instance_cache()
    return {"credential_leaks": len(leaks), "credential_leak_places": leaks}


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crash-trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    origin = provenance(config=vars(args), seeds={"crash_campaign": args.seed})
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    results = {}
    with tempfile.TemporaryDirectory(prefix="darwinlm-reliability-") as folder:
        scratch = Path(folder)
        os.environ["DARWINLM_HOME"] = str(scratch / "home")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        results.update(bad_input_campaign(scratch / "bad"))
        write_partial("reliability", results)  # a long run keeps what it measured (outside bench/results)
        results.update(storage_campaign(scratch / "storage"))
        write_partial("reliability", results)
        with prefect_test_harness(server_startup_timeout=120):
            results.update(credential_campaign(scratch))
            write_partial("reliability", results)
            results.update(crash_campaign(args.crash_trials, args.seed, PREFECT_API_URL.value(), scratch / "crash"))
    write_results("reliability", results, origin=origin)
    keys = ("crash_trials", "crash_resumed", "finished_stages_rerun", "corrupted_artifacts", "stale_temporaries",
            "result_mismatches", "storage_faults_injected", "storage_faults_recovered",
            "storage_permanent_clear_error", "bad_inputs_tried", "bad_inputs_clean_error", "credential_leaks")
    print(json.dumps({key: results[key] for key in keys}, indent=1))


if __name__ == "__main__":
    main()
