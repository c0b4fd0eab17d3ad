"""The package's layout: one job per room. Read from the source with ``ast``, nothing is imported.

- no import circle among jitrope's modules, counting the imports made inside functions too (a
  deferred import hides a circle, it does not remove it);
- the command-line modules (``python -m jitrope.train|sample|evaluate|convert``) sit on top: no other
  module of the package imports them;
- functions fit on a screen: none in python/ or scripts/ over 100 lines, at most 5 over 60.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "jitrope"
CLIS = {"jitrope.train", "jitrope.sample", "jitrope.evaluate", "jitrope.convert"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from . import ops: a module
    # a module's own packages are loaded before it in any case: importing from them (jitrope.ops reads
    # jitrope.HAS_EXTENSION) is no arrow of the graph
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in ancestors}


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _circle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle of ``graph`` (a list of modules, the first again at the end), or []."""
    state: Dict[str, int] = {}  # 1: on the path, 2: done
    path: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_circle_even_through_imports_inside_functions():
    assert _circle(_graph()) == []


def test_no_module_of_the_package_imports_a_command_line_module():
    graph = _graph()
    assert CLIS <= set(graph)
    assert {m: sorted(graph[m] & CLIS) for m in graph if graph[m] & CLIS} == {}


def _functions(root: Path) -> Iterator[Tuple[int, str]]:
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def test_functions_fit_on_a_screen():
    lengths = sorted([*_functions(ROOT / "python"), *_functions(ROOT / "scripts")], reverse=True)
    assert [f for n, f in lengths if n > 100] == []
    assert len([f for n, f in lengths if n > 60]) <= 5, [f"{f} ({n} lines)" for n, f in lengths if n > 60]


def test_every_console_script_is_a_command_line_module_and_runs():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    targets = re.findall(r'^jitrope-\w+ = "([\w.]+):(\w+)"$', section, re.M)
    assert len(targets) == 4 and {m for m, _ in targets} == CLIS and {f for _, f in targets} == {"main"}
    r = subprocess.run(  # the evaluation's command lives apart from its library (jitrope.eval)
        [sys.executable, "-m", "jitrope.evaluate", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "python"), "PATH": ""},
        timeout=300,
    )
    assert r.returncode == 0 and "held-out" in r.stdout, r.stderr
