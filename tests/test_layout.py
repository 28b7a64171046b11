"""The architecture page's module map names every module of the package, and nothing else."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO


def _mapped() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        names.update(re.findall(r"`([\w/]+\.py)`", first_cell))
    # rows under a package heading name their modules relative to distbert/
    return {f"distbert/{n}" for n in names}


def _docstring_only(path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def _tree() -> set[str]:
    """Every module; a package's ``__init__.py`` holding only a docstring is its bold row instead."""
    return {str(p.relative_to(REPO)) for p in (REPO / "distbert").rglob("*.py")
            if "__pycache__" not in p.parts and not (p.name == "__init__.py" and _docstring_only(p))}


def test_module_map_matches_the_tree():
    mapped, tree = _mapped(), _tree()
    assert not tree - mapped, f"modules missing from docs/architecture.md: {sorted(tree - mapped)}"
    assert not mapped - tree, f"docs/architecture.md names modules that do not exist: {sorted(mapped - tree)}"


def test_readme_points_at_the_architecture_page():
    assert "docs/architecture.md" in (REPO / "README.md").read_text()
