"""Who may import what: the rooms docs/architecture.md draws, checked on the source (ast, nothing is
imported). torchship is one import package; its parts are torchship.<part>, and models/, export/, handlers/ and
deploy/ at the repository's top are linked into it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "torchship"
#: The package's parts (folders with an __init__.py, the linked ones included) and its top-level modules.
PARTS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
#: The names the project's parts had before they moved into one package: nothing may import them at the top level.
OLD_ROOTS = {"models", "export", "handlers", "archive", "engines", "verify", "reliability", "cpp", "deploy", "bench"}
SERVER_SIDE = ("handlers", "archive", "engines", "verify", "deploy", "export", "models")


def _modules(part: str) -> dict[str, Path]:
    """torchship.<part>'s modules by dotted name (following the linked folders)."""
    root = PACKAGE / part
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            if name.endswith(".py"):
                rel = (Path(folder) / name).relative_to(PACKAGE).with_suffix("")
                found[".".join(("torchship", *rel.parts)).removesuffix(".__init__")] = Path(folder) / name
    return found


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names imported by path (relative imports are the handler package's own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _importers(part: str, forbidden: str) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, path in sorted(_modules(part).items())
        for name in sorted(_imports(path))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def _all_python_files() -> list[Path]:
    shipped = [p for part in PARTS for p in _modules(part).values()]
    return shipped + sorted(PACKAGE.glob("*.py")) + sorted((REPO / "tests").rglob("*.py"))


def test_one_import_root_nothing_imports_the_old_top_level_names() -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in _all_python_files()
        for name in _imports(path)
        if name.split(".")[0] in OLD_ROOTS
    ]
    assert not bad, bad


def test_the_handler_package_imports_nothing_of_the_project_and_only_itself_relatively() -> None:
    # It travels inside every .mar as torchship_handler/: an absolute torchship import would not resolve there.
    for module, path in _modules("handlers").items():
        project = {m for m in _imports(path) if m.split(".")[0] in {"torchship", "torchship_handler"}}
        assert not project, (module, project)


def test_the_archive_reader_imports_only_the_handler_package() -> None:
    imported = {m for m in _imports(PACKAGE / "archive" / "mar.py") if m.startswith("torchship")}
    assert all(m.startswith("torchship.handlers") for m in imported), imported


def test_the_ray_app_imports_only_the_handler_package_and_the_archive_reader_at_module_level() -> None:
    top = {m for m in _imports(PACKAGE / "engines" / "ray" / "app.py", top_level_only=True) if m.startswith("torchship")}
    allowed = ("torchship.handlers", "torchship.archive.mar", "torchship.archive.signing", "torchship.engines.ray")
    assert {m for m in top if not m.startswith(allowed) and m != "torchship"} <= {"torchship.__version__"}, top


@pytest.mark.parametrize(("part", "forbidden"), [("engines", "torchship.deploy"), ("deploy", "torchship.engines")])
def test_engines_and_deploy_do_not_import_each_other(part: str, forbidden: str) -> None:
    assert not _importers(part, forbidden)


@pytest.mark.parametrize("part", [p for p in PARTS if p != "cli"])
def test_nothing_imports_the_cli(part: str) -> None:
    assert not _importers(part, "torchship.cli")


def test_no_top_level_module_imports_the_cli() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("torchship.cli")}, path


@pytest.mark.parametrize("part", SERVER_SIDE)
def test_what_serves_or_starts_a_server_never_imports_the_tooling_that_attacks_or_measures_it(part: str) -> None:
    assert not _importers(part, "torchship.reliability") + _importers(part, "torchship.bench")


@pytest.mark.parametrize(("engine", "other"), [("torchserve", "ray"), ("ray", "torchserve")])
def test_each_engine_keeps_to_its_own_package(engine: str, other: str) -> None:
    assert not _importers(f"engines/{engine}", f"torchship.engines.{other}")


def test_only_the_ray_package_and_the_benchs_ray_apps_import_ray() -> None:
    users = {
        module
        for part in PARTS
        for module, path in _modules(part).items()
        if any(m == "ray" or m.startswith("ray.") for m in _imports(path))
    }
    assert users, "the scan found no Ray user"
    bench_apps = {"torchship.bench.peers.ray_stock_app", "torchship.bench.one_hop"}  # a peer, and a measured design
    assert {m for m in users if not m.startswith("torchship.engines.ray")} <= bench_apps, users


def test_deploy_holds_cluster_code_only() -> None:
    # Manifests, their sync and validation, the KServe store, the rollout: no launcher, no engine, no Ray.
    assert set(_modules("deploy")) == {
        "torchship.deploy",
        "torchship.deploy.crds",
        "torchship.deploy.kserve",
        "torchship.deploy.kube",
        "torchship.deploy.monitoring",
        "torchship.deploy.pod_config",
        "torchship.deploy.rollout",
    }
    assert not _importers("deploy", "ray")


def test_the_pipeline_is_not_inside_a_stage() -> None:
    assert (PACKAGE / "pipeline.py").is_file()
    assert not any(name.endswith(".pipeline") for part in PARTS for name in _modules(part))


def test_the_check_sees_every_part() -> None:
    assert {"handlers", "archive", "engines", "verify", "reliability", "deploy", "bench", "models", "export", "cli"} <= set(PARTS)
    assert len(_modules("engines")) >= 10, "the scan did not follow the engine packages"
    assert "torchship.handlers.core" in _modules("handlers"), "the scan did not follow the linked handlers/ folder"
