"""The direction of imports the README's architecture section states, checked on the source (ast, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")
#: Layers that may not import a given set of packages, and why.
FORBIDDEN: dict[str, set[str]] = {
    # Every stage and library module: the CLI sits on top of them all.
    **{pkg: {"torchship.cli"} for pkg in ("models", "export", "handlers", "archive", "engines", "verify", "deploy", "cpp")},
    # What runs in a server, or starts one, never imports the tooling that attacks or measures it.
    **{pkg: {"reliability", "bench"} for pkg in ("handlers", "archive", "engines", "verify", "deploy", "export", "models")},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _project_imports(package: str) -> dict[str, set[str]]:
    return {
        str(path.relative_to(REPO)): {m for m in _imports(path) if m.split(".")[0] in PACKAGES}
        for path in sorted((REPO / package).rglob("*.py"))
    }


def test_the_handler_package_imports_nothing_of_the_project_but_itself() -> None:
    for module, imported in _project_imports("handlers").items():
        assert {m.split(".")[0] for m in imported} <= {"handlers"}, (module, imported)


def test_the_archive_reader_imports_only_the_handler_package() -> None:
    imported = _project_imports("archive")[str(Path("archive") / "mar.py")]
    assert {m.split(".")[0] for m in imported} <= {"handlers"}, imported


def test_the_ray_app_imports_only_the_handler_package_and_the_archive_reader_at_module_level() -> None:
    tree = ast.parse((REPO / "deploy" / "ray_app.py").read_text(encoding="utf-8"))
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    top |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    project = {m for m in top if m.split(".")[0] in PACKAGES}
    assert project <= {"handlers", "handlers.codec", "handlers.core", "handlers.errors", "handlers.names", "archive.mar"}, project


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_what_sits_above_it(package: str) -> None:
    for module, imported in _project_imports(package).items():
        bad = {m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[package])}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_check_sees_every_package() -> None:
    assert {"handlers", "archive", "engines", "verify", "reliability", "deploy", "bench", "torchship"} <= set(PACKAGES)
    assert _project_imports("reliability"), "the scan found no modules"
