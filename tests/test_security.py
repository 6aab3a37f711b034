"""Security: weights never unpickle arbitrary objects, credentials never reach MLflow, Prefect or the store,
and exports carry only darwinlm's own modeling code."""

import ast
import pickle
from pathlib import Path

import fsspec
import pytest

from tests.support import crash_campaign as campaign
from tests.support.credentials import SENTINELS
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.model.loading import load_model
from tests.support.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_a_pickled_checkpoint_is_refused_without_running_its_code(tmp_path):
    folder = tmp_path / "checkpoint"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    marker = tmp_path / "marker"
    state = {name: tensor for name, tensor in model.state_dict().items()}
    state["model.evil"] = _Payload(str(marker))
    with open(folder / "pytorch_model.bin", "wb") as file:
        pickle.dump(state, file)
    with pytest.raises(DarwinLMError) as error:
        load_model(str(folder))
    assert not marker.exists()
    assert "\n" not in str(error.value) and "safetensors" in str(error.value)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords}


# The one file allowed trust_remote_code=True: the MLflow model of a registered version ("models from code"). It runs
# only where a user loads that MLflow model, and loading any pyfunc model already executes the code logged with it;
# the exported folder's modeling code was logged by the same registration, so trusting it adds no new trust.
TRUSTS_ITS_OWN_LOGGED_CODE = {"tasks/mlflow_text_generation.py"}


def test_code_never_unpickles_or_trusts_remote_code():
    """No torch.load without weights_only=True, no pickle loads, no trust_remote_code=True, in any package."""
    trusting = set()
    for package in ("darwinlm_core", "tasks", "flows"):  # the folders of darwinlm.core, .tasks, .flows
        for path in (REPO / package).rglob("*.py"):
            for function, keywords in _calls(ast.parse(path.read_text())):
                where = f"{path.relative_to(REPO)}: {function}"
                assert not function.endswith(("pickle.load", "pickle.loads", "dill.load")), where
                if function.endswith("torch.load"):
                    assert keywords.get("weights_only") == "True", where
                if keywords.get("trust_remote_code") == "True":
                    trusting.add(str(path.relative_to(REPO)))
    assert trusting == TRUSTS_ITS_OWN_LOGGED_CODE  # and the exemption goes when its file stops needing it


@pytest.fixture()
def sentinel_s3(s3_endpoint, monkeypatch):
    """The moto bucket reached with sentinel credentials, from the environment and fsspec's config."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SENTINELS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINELS["secret"])
    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": SENTINELS["key"], "secret": SENTINELS["secret"],
                                                   "client_kwargs": {"endpoint_url": s3_endpoint}})
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.integration
def test_credentials_never_reach_mlflow_prefect_logs_or_the_store(tmp_path, monkeypatch, sentinel_s3, capfd):
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.credentials import credential_leaks
    from darwinlm.flows.compress import CompressParameters, compress

    monkeypatch.setenv("DARWINLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    workspace = campaign.make_workspace(tmp_path / "workspace")
    with prefect_test_harness(server_startup_timeout=120):
        summary = compress(CompressParameters(**campaign.parameters(workspace, store="s3://darwinlm/secure")))
        captured = capfd.readouterr()
        assert credential_leaks(SENTINELS, "s3://darwinlm/secure", [captured.out, captured.err]) == []

    s3 = fsspec.filesystem("s3")
    code = [path for path in s3.find(summary["model_uri"].removeprefix("s3://")) if path.endswith(".py")]
    assert [Path(path).name for path in code] == ["modeling_pruned.py"]
    assert s3.cat_file(code[0]) == (REPO / "darwinlm_core" / "model" / "pruned.py").read_bytes()
