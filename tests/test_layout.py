"""The package layout: modules that moved into jitrope.data / jitrope.eval keep their old import paths."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import jitrope

ROOT = Path(__file__).resolve().parents[1]
OLD_PATHS = {**jitrope.MOVED_MODULES, "jitrope.evaluate": "jitrope.eval.evaluate"}


@pytest.mark.parametrize("old,new", sorted(OLD_PATHS.items()))
def test_an_old_path_imports_the_same_module_and_objects(old, new):
    module = importlib.import_module(new)
    assert importlib.import_module(old) is module
    assert getattr(jitrope, old.rpartition(".")[2]) is module  # from jitrope import <old name>
    assert module.__name__ == new and module.__spec__.name == new  # the alias leaves the real module as it was
    public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    assert public
    old_module = sys.modules[old]
    for name in public:
        assert getattr(old_module, name) is getattr(module, name)
    exec(f"from {old} import {public[0]} as obj", (ns := {}))
    assert ns["obj"] is getattr(module, public[0])


def test_data_and_eval_are_subpackages_and_data_keeps_its_names():
    from jitrope import data
    from jitrope.data import imageset

    assert Path(data.__file__).name == "__init__.py" and data.ImageSet is imageset.ImageSet
    assert data.composite_on_white is imageset.composite_on_white
    assert set(data.__all__) <= set(vars(data))
    assert not (ROOT / "python" / "jitrope" / "imageset.py").exists()  # no file at the old path: git follows renames


def test_python_m_jitrope_evaluate_still_runs():
    for module in ("jitrope.evaluate", "jitrope.eval.evaluate"):
        r = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT / "python"), "PATH": ""},
            timeout=300,
        )
        assert r.returncode == 0 and "held-out" in r.stdout, r.stderr
