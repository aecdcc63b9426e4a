"""Shared fixtures: the zoo exported and archived once per test session, each in its own temp folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import E2E_MODEL_CONFIG, run_cli
from torchship.archive.build import Endpoint, archive_models, load_model_config
from torchship.archive.mar import MarArchive
from torchship.archive.signing import write_key_pair
from torchship.export.exporter import ModelExport
from torchship.manifest import read_manifest
from torchship.models import ZOO

USER_MODELS = Path(__file__).parent / "fixtures" / "user_models"
#: The model whose AOTInductor package the suite builds (compiling one takes ~30 s on 2 cores).
AOTI_MODEL = "simple_cnn"


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelExport]:
    """Every zoo model exported by `torchship export` (TorchScript and .pt2; simple_cnn also as AOTInductor) into a
    fresh folder: each model in a fresh process, as users run it (test_export holds another CLI export's bytes
    against these; test_cli's AOTInductor test reads simple_cnn's). The default endpoint is pinned to TorchScript
    so that endpoint names do not depend on this machine's timings (the measured choice is tested on its own).
    The two exports run at once: each writes only its own models' folders, and the rest's export does its work while
    the AOTInductor compiler runs (measured back to back: 45 s against 65 s, every file but the AOTInductor
    package, which no two compiles make alike, byte-identical)."""
    out = tmp_path_factory.mktemp("artifacts")
    rest = [name for name in ZOO if name != AOTI_MODEL]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [
            pool.submit(run_cli, "export", "--aoti", AOTI_MODEL, "--default-format", "torchscript", "--out", str(out)),
            pool.submit(run_cli, "export", *rest, "--default-format", "torchscript", "--out", str(out)),
        ]
        for run in runs:
            run.result()
    return {name: ModelExport(spec, out / name, read_manifest(out / name), []) for name, spec in ZOO.items()}


@pytest.fixture(scope="session")
def artifacts_dir(zoo_export: dict[str, ModelExport]) -> Path:
    return next(iter(zoo_export.values())).model_dir.parent


@pytest.fixture(scope="session")
def archives(
    zoo_export: dict[str, ModelExport], artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Endpoint]:
    """Every usable format of every zoo model archived with the real torch-model-archiver."""
    store = tmp_path_factory.mktemp("model_store")
    endpoints = archive_models([], artifacts=artifacts_dir, out_dir=store, model_config=load_model_config())
    return {e.name: e for e in endpoints}


@pytest.fixture(scope="session")
def e2e_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(signing key, verify key) of e2e_store."""
    return write_key_pair(tmp_path_factory.mktemp("e2e_keys"))


@pytest.fixture(scope="session")
def e2e_store(artifacts_dir: Path, e2e_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every archive, signed, with E2E_MODEL_CONFIG: the TorchServe and Ray Serve e2e suites both serve it behind
    their signature checks (built once; no test writes into it)."""
    out = tmp_path_factory.mktemp("e2e_store")
    archive_models([], artifacts=artifacts_dir, out_dir=out, model_config=E2E_MODEL_CONFIG, sign_key=e2e_keys[0])
    return out


def unpack(mar: Path, dest: Path) -> Path:
    """Unpack a .mar (into dest/<sha256>/, as the Ray app does); the folder is what the handler sees as model_dir."""
    return MarArchive(mar).unpack_cached(dest)


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the fixture package `my_pkg` importable, as a user's own package would be."""
    monkeypatch.syspath_prepend(str(USER_MODELS))
    return USER_MODELS
