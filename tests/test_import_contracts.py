"""The package's import structure (CONTRIBUTING.md "Layers"): the import-linter contracts in pyproject.toml (no
cycles, no stage -> stage, no config -> stage, layers), meshes made only in `parallel/`, stage files kept thin, and
no function-local imports of the project's own modules where the layers are enforced."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "recogdrive_jax")
MESH_CALLS = {"Mesh", "make_mesh"}
# Where function-local imports of recogdrive_jax modules are not allowed (only heavy optional deps may be local).
NO_LOCAL_IMPORTS = ["stages", "vlm", "parallel", "configs.py", "recipes.py", "stage_configs.py", "rl/ppo.py"]
MAX_STAGE_LINES = 250


def _py_files(*parts):
    for part in parts:
        path = os.path.join(PKG, part)
        if os.path.isfile(path):
            yield path
            continue
        for root, _, files in os.walk(path):
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (pip install -e .[test])"
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_meshes_are_made_only_in_parallel():
    bad = []
    for path in _py_files("."):
        rel = os.path.relpath(path, PKG)
        if rel.startswith("parallel" + os.sep):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in MESH_CALLS:
                    bad.append(f"{rel}:{node.lineno} {ast.unparse(f)}(...)")
    assert not bad, "build the mesh with parallel.runtime.from_config: " + "; ".join(bad)


def test_no_function_local_project_imports_in_the_layered_code():
    bad = []
    for path in _py_files(*NO_LOCAL_IMPORTS):
        tree = ast.parse(open(path).read(), path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(m.startswith("recogdrive_jax") for m in mods):
                    bad.append(f"{os.path.relpath(path, PKG)}:{node.lineno}")
    assert not bad, "import the project's modules at the top of the file: " + ", ".join(bad)


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(PKG, "stages"))
                                        if f.endswith(".py") and f != "__init__.py"))
def test_stage_files_stay_thin(name):
    n = sum(1 for _ in open(os.path.join(PKG, "stages", name + ".py")))
    assert n <= MAX_STAGE_LINES, f"stages/{name}.py has {n} lines: move library code into vlm/, eval/, data/, ..."


def test_config_files_import_no_stage():
    """configs/*.py are not in the package, so import-linter does not see them: the same rule by AST."""
    bad = []
    for root, _, files in os.walk(os.path.join(ROOT, "configs")):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(m == "recogdrive_jax.stages" or m.startswith("recogdrive_jax.stages.") for m in mods):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not bad, "take defaults from recogdrive_jax.stage_configs / configs: " + ", ".join(bad)
