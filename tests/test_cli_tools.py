"""`darwinlm mlflow-ui` and `darwinlm server` run a venv tool in the foreground: the right arguments, darwinlm's
telemetry defaults, and a quiet stop on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

from darwinlm.tasks.tracking import mlflow_ui_arguments


def test_the_mlflow_ui_reads_darwinlm_s_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path))
    arguments = mlflow_ui_arguments(5001)
    assert arguments[:3] == ["ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert arguments[arguments.index("--port") + 1] == "5001"
    assert arguments[arguments.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()


def test_ctrl_c_stops_the_tool_and_darwinlm_quietly(tmp_path):
    """A stand-in `mlflow` on PATH records its arguments and environment, then waits; Ctrl-C (SIGINT to the
    process group, as a terminal sends it) must end both without a Python traceback from darwinlm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called.txt"
    tool = bin_dir / "mlflow"
    tool.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                    f"open({str(record)!r}, 'w').write(' '.join(sys.argv[1:]) + '|' + "
                    "os.environ.get('MLFLOW_DISABLE_TELEMETRY', ''))\n"
                    "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    sys.exit(0)\n")
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DARWINLM_HOME": str(tmp_path)}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
    process = subprocess.Popen([sys.executable, "-m", "darwinlm.flows.cli", "mlflow-ui"], env=env,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not record.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    arguments, telemetry = record.read_text().split("|")
    assert arguments.startswith("ui --backend-store-uri sqlite:///") and telemetry == "true"
    assert "Traceback" not in stderr and "darwinlm: mlflow stopped" in stderr
    assert process.returncode == 0
