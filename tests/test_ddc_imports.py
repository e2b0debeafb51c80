"""The package's import structure: the baselines' modules load without the optimizer, and
``ddc/`` has no import circle."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

DDC_DIR = pathlib.Path(__file__).resolve().parent.parent / "ddc"


def _modules_after(code: str) -> set[str]:
    """The ``ddc`` modules loaded by ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(m for m in sys.modules "
                          "if m == 'ddc' or m.startswith('ddc.')))"],
                         capture_output=True, text=True, check=True, cwd=DDC_DIR.parent)
    return set(out.stdout.split())


@pytest.mark.parametrize("code", [
    "import ddc.param_groups, ddc.muon_kernels",
    "from ddc import param_groups, parameter_roles",
    "from ddc.muon_kernels import muon",
    "import baselines.muon, baselines.library, baselines.scale",
])
def test_param_groups_and_muon_kernels_load_without_the_optimizer(code):
    loaded = _modules_after(code)
    assert "ddc.param_groups" in loaded or "ddc.muon_kernels" in loaded
    assert "ddc.optimizer" not in loaded, sorted(loaded)


def test_public_names_still_import():
    loaded = _modules_after("from ddc import DDC, find_gauges, verify_gauges, param_groups, gauges\n"
                            "import ddc\nassert callable(ddc.param_groups) and callable(ddc.DDC)")
    assert {"ddc.optimizer", "ddc.find", "ddc.verify"} <= loaded


def _imports(path: pathlib.Path) -> set[str]:
    """The ``ddc`` modules that ``path`` imports, at module level or inside functions
    (imports under ``if TYPE_CHECKING:`` never run and are left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_circle_in_ddc():
    graph = {p.stem: _imports(p) for p in DDC_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    circles = [m for m in graph if m in reach(m)]
    assert not circles, {m: graph[m] for m in circles}
