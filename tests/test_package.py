"""The package: one version, declared dependencies (setup.py defers to pyproject.toml), licence, and no
test data on its import path."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import regionssl

from conftest import HANG_TIMEOUT, ROOT


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _dist(requirement):
    """Normalised distribution name of a requirement string."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_one_version():
    project = _pyproject()
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "regionssl.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", regionssl.__version__)
    assert not os.path.exists(os.path.join(ROOT, "setup.cfg"))


def test_setup_py_defers_to_pyproject():
    """setup.py is one bare ``setup()`` call: metadata and dependencies are read from pyproject.toml."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [(c.func.id, c.args, c.keywords) for c in calls] == [("setup", [], [])]
    r = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=ROOT, capture_output=True,
                       text=True, timeout=HANG_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == [_pyproject()["project"]["name"], regionssl.__version__]


def test_license_is_apache_2_like_detectron2():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def _imported_modules(folder):
    """Top-level names of every module imported (at any depth) by the .py files under ``folder``."""
    names = set()
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    # both installed packages: the library and the workbench beside it
    imported = _imported_modules(os.path.join(ROOT, "regionssl")) | _imported_modules(os.path.join(ROOT, "regionssl_workbench"))
    for module in imported:
        if module in sys.stdlib_module_names or module in ("regionssl", "regionssl_workbench"):
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"regionssl or its workbench imports {module!r}, which no installed distribution provides"
        if "detectron2" in module:  # not on PyPI: installed first (README "Installing Detectron2")
            continue
        if not dists & (declared | extras):
            missing[module] = sorted(dists)
    assert not missing, f"imported by regionssl but not declared in pyproject.toml: {missing}"
    # the optional integrations are extras, not runtime dependencies
    assert {"submitit", "wandb", "mlflow-skinny"} <= extras and not {"submitit", "wandb", "mlflow-skinny"} & declared


def test_requirements_split_runtime_and_test():
    def reqs(name):
        with open(os.path.join(ROOT, name)) as f:
            return {_dist(line) for line in f if line.strip() and not line.startswith("#")}

    runtime, test = reqs("requirements.txt"), reqs("requirements-test.txt")
    assert "pytest" in test and "pytest" not in runtime
    declared = {_dist(r) for r in _pyproject()["project"]["dependencies"]} - {"torch", "torchvision"}
    assert declared <= runtime  # torch/torchvision: pinned by scripts/setup_env.sh
    assert {_dist(r) for r in _pyproject()["project"]["optional-dependencies"]["test"]} == test


def test_importing_regionssl_registers_no_test_data():
    code = ("import sys, regionssl\nfrom detectron2.data import DatasetCatalog\n"
            "print(sorted(n for n in DatasetCatalog.list() if n.startswith('regionssl_')))\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'regionssl_workbench'))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    names, workbench_modules = r.stdout.strip().splitlines()[-2:]
    assert "regionssl_tiny" not in names and workbench_modules == "[]"  # the library never imports the workbench
    # the built-in image-only datasets stay registered (lazily)
    assert "regionssl_demo_images_train" in names and "regionssl_photos_train" in names
