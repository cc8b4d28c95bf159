"""The layout the README draws: layers whose imports run one way, a generic sweeper, and
modules small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finqa_exp"

# Bottom to top, as the README's layout section draws them: a module may import its own
# layer and the layers below it, never one above.
LAYERS = [
    {"errors"},
    {"config", "devices"},
    {"tracking"},
    {"data", "prompts", "metrics", "stats"},
    {"corpus"},
    {"modeling", "tiny"},
    {"checkpoints"},
    {"training", "evaluation", "text_eval"},
    {"serving"},
    {"trial"},
    {"report", "bench"},
    {"__main__", "ask"},
    {"app"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MODULES = sorted(PACKAGE.rglob("*.py"))


def unit(path: Path) -> str:
    """The top-level module or package of finqa_exp that ``path`` belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def finqa_imports(path: Path) -> set[str]:
    """The finqa_exp units that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "finqa_exp":
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("finqa_exp.")}
    return found - {unit(path)}


def test_every_module_has_a_layer():
    units = {unit(p) for p in MODULES} - {"__init__"}
    assert units - {"sweep"} == set(LAYER), "add new modules to LAYERS and the README"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards_only(path):
    if unit(path) in ("__init__", "sweep"):
        return
    above = {m for m in finqa_imports(path) if LAYER.get(m, -1) > LAYER[unit(path)]}
    assert not above, f"{path.name} imports {sorted(above)}, a layer above it"


def test_the_sweeper_imports_nothing_else_of_finqa_exp():
    for path in (PACKAGE / "sweep").rglob("*.py"):
        assert finqa_imports(path) == set(), path


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long
