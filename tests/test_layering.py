"""The house rules a test can check: layers import only downwards (core < tasks < flows; bench and tests on
top, tests never from bench), the core never imports prefect or mlflow and imports nothing heavy on its own,
every package is imported under the one `darwinlm` namespace, and no package reaches into another's private
(`_name`) definitions — what one package needs from another gets a public name there."""

import ast
import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import darwinlm.core

ROOT = Path(__file__).resolve().parents[1]
# folder -> the dotted prefix it is imported as; the order is the layering, lowest first
PACKAGES = {"darwinlm_core": "darwinlm.core", "tasks": "darwinlm.tasks", "flows": "darwinlm.flows",
            "bench": "bench", "tests": "tests"}
MAY_IMPORT = {
    "darwinlm_core": {"darwinlm_core"},
    "tasks": {"darwinlm_core", "tasks"},
    "flows": {"darwinlm_core", "tasks", "flows"},
    "bench": {"darwinlm_core", "tasks", "flows", "bench", "tests"},  # tests/support holds the shared fixtures
    "tests": {"darwinlm_core", "tasks", "flows", "tests"},
}
OLD_TOP_LEVEL_NAMES = ("darwinlm_core", "tasks", "flows")  # installed only as darwinlm.core / .tasks / .flows


def folder_of(module: str) -> str | None:
    """The repository folder that holds `module`, or None for a third-party module."""
    for folder, prefix in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return None


def imports(root: Path = ROOT):
    """(folder, path, line, module, names) for every absolute import in the repository's packages."""
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    yield folder, path, node.lineno, node.module, [alias.name for alias in node.names]
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        yield folder, path, node.lineno, alias.name, []


def layering_violations(root: Path = ROOT) -> list[str]:
    found = []
    for folder, path, line, module, _ in imports(root):
        where = f"{path.relative_to(root)}:{line} {module}"
        if module.split(".")[0] in OLD_TOP_LEVEL_NAMES:
            found.append(f"{where} (import it as darwinlm.*)")
        target = folder_of(module)
        if target is not None and target not in MAY_IMPORT[folder]:
            found.append(f"{where} ({folder} may not import {target})")
    return found


def private_imports_across_packages(root: Path = ROOT) -> list[str]:
    """`from other_package.module import _name` and `other_package.module._name` uses, as 'file:line name'."""
    found = []
    for folder, path, line, module, names in imports(root):
        if folder_of(module) not in (None, folder):
            found += [f"{path.relative_to(root)}:{line} {name}" for name in names
                      if name.startswith("_") and not name.startswith("__")]
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
                    owner = folder_of(ast.unparse(node.value))
                    if owner not in (None, folder) and node.attr.startswith("_") and not node.attr.startswith("__"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.attr}")
    return found


# Inside the core, model/ is the lowest layer (architectures, the driver, the pruned classes): what the database
# and the search are built on, never built on them. And no subpackage imports the package's own __init__, which
# imports from them.
MODEL_MAY_IMPORT = ("darwinlm.core.model", "darwinlm.core.errors", "darwinlm.core.home", "darwinlm.core.uri_io")


def core_upward_imports(root: Path = ROOT) -> list[str]:
    core = root / "darwinlm_core"
    found = []
    for folder, path, line, module, names in imports(root):
        if folder != "darwinlm_core" or path.parent == core:
            continue
        where = f"{path.relative_to(root)}:{line}"
        if module == "darwinlm.core":
            found += [f"{where} darwinlm.core.{name} (the package __init__)" for name in names
                      if not (core / f"{name}.py").exists() and not (core / name).is_dir()]
        if path.parent.name == "model" and module.startswith("darwinlm.core.") and not module.startswith(
                MODEL_MAY_IMPORT):
            found.append(f"{where} {module} (model/ is the core's lowest layer)")
    return found


def test_the_core_s_subpackages_import_no_higher_layer():
    assert core_upward_imports() == []


def test_the_core_layer_check_can_fail(tmp_path):
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "darwinlm_core" / "model").mkdir()
    (tmp_path / "darwinlm_core" / "model" / "a.py").write_text(
        "from darwinlm.core.database.store import Database\nfrom darwinlm.core import register_pruned_classes\n")
    assert core_upward_imports(tmp_path) == [
        "darwinlm_core/model/a.py:1 darwinlm.core.database.store (model/ is the core's lowest layer)",
        "darwinlm_core/model/a.py:2 darwinlm.core.register_pruned_classes (the package __init__)"]


def test_layers_import_only_downwards_and_under_the_namespace():
    assert layering_violations() == []


def bench_imports_by_name(root: Path = ROOT) -> list[str]:
    """Tests that reach bench/ by a module name in a string (importorskip, import_module), which the
    import statements above do not show: 'file:line'."""
    found = []
    for path in sorted((root / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == "bench"
                    and ast.unparse(node.func).split(".")[-1] in ("importorskip", "import_module", "__import__")):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_tests_do_not_import_bench_by_name_either(tmp_path):
    assert bench_imports_by_name() == []
    (tmp_path / "tests").mkdir()
    planted = "bench" + ".headline"  # spelled apart, so a plain grep for such imports does not find this test
    (tmp_path / "tests" / "e.py").write_text(f'import pytest\nsearch = pytest.importorskip("{planted}")\n')
    assert bench_imports_by_name(tmp_path) == ["tests/e.py:2"]


def test_no_package_uses_another_packages_private_names():
    assert private_imports_across_packages() == []


def test_the_checks_can_fail(tmp_path):
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "tasks" / "a.py").write_text("from darwinlm.core.database.obs import _private_helper\n")
    (tmp_path / "flows" / "b.py").write_text("import darwinlm.tasks.stages\ndarwinlm.tasks.stages._LIVE.clear()\n")
    (tmp_path / "darwinlm_core" / "c.py").write_text("from darwinlm.tasks.stages import compress\n")
    (tmp_path / "tests" / "d.py").write_text("from bench.search import main\nimport flows.cli\n")
    assert private_imports_across_packages(tmp_path) == ["tasks/a.py:1 _private_helper", "flows/b.py:2 _LIVE"]
    assert layering_violations(tmp_path) == [
        "darwinlm_core/c.py:1 darwinlm.tasks.stages (darwinlm_core may not import tasks)",
        "tests/d.py:1 bench.search (tests may not import bench)",
        "tests/d.py:2 flows.cli (import it as darwinlm.*)",
    ]


def imported_after(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """Which modules of `packages` a fresh interpreter has imported after importing `modules`."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_no_core_module_imports_prefect_or_mlflow():
    modules = sorted(info.name for info in pkgutil.walk_packages(darwinlm.core.__path__, "darwinlm.core."))
    assert len(modules) > 30  # every module of the core, not a hand-picked few
    assert imported_after(modules, ('prefect', 'mlflow')) == []


def test_entry_points_import_no_hub_code_before_setting_the_offline_defaults():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: the CLI and the flows set the offline defaults
    when they start, so importing them (and the core, and its class registry) must not import it already."""
    modules = ["darwinlm.core", "darwinlm.core.config", "darwinlm.flows.cli", "darwinlm.flows.compress",
               "darwinlm.flows.nightly"]
    assert imported_after(modules, ('transformers', 'huggingface_hub')) == []


def test_pyproject_lists_every_package_of_the_tree():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {dotted: folder for dotted, folder in setuptools["package-dir"].items()}
    tree = set()
    for dotted, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                tree.add(".".join([dotted, *init.parent.relative_to(ROOT / folder).parts]))
    assert sorted(setuptools["packages"]) == sorted(tree)
