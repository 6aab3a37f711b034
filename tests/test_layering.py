"""The house rules a test can check: the core never imports prefect or mlflow, and no package reaches into
another's private (`_name`) definitions — what one package needs from another gets a public name there."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import darwinlm_core

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("darwinlm_core", "tasks", "flows", "bench", "tests")


def test_no_core_module_imports_prefect_or_mlflow():
    modules = sorted(info.name for info in pkgutil.walk_packages(darwinlm_core.__path__, "darwinlm_core."))
    assert len(modules) > 20  # every module of the core, not a hand-picked few
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def private_imports_across_packages(root: Path = ROOT) -> list[str]:
    """`from other_package.module import _name` and `other_package.module._name` uses, as 'file:line name'."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    owner = node.module.split(".")[0]
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
                    owner, names = ast.unparse(node.value).split(".")[0], [node.attr]
                else:
                    continue
                if owner in PACKAGES and owner != package:
                    found += [f"{path.relative_to(root)}:{node.lineno} {name}" for name in names
                              if name.startswith("_") and not name.startswith("__")]
    return found


def test_no_package_uses_another_packages_private_names():
    assert private_imports_across_packages() == []


def test_the_private_name_check_can_fail(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "a.py").write_text("from darwinlm_core.obs import _private_helper\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "b.py").write_text("import tasks.stages\ntasks.stages._LIVE.clear()\n")
    for package in set(PACKAGES) - {"tasks", "flows"}:
        (tmp_path / package).mkdir()
    assert private_imports_across_packages(tmp_path) == ["tasks/a.py:1 _private_helper", "flows/b.py:2 _LIVE"]
