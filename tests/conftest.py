"""Shared fixtures: the zoo exported once per test session into its own temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.exporter import ModelExport, export_model
from models import ZOO

USER_MODELS = Path(__file__).parent / "fixtures" / "user_models"


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelExport]:
    """Every zoo model exported (TorchScript and .pt2) into a fresh folder."""
    out = tmp_path_factory.mktemp("artifacts")
    return {name: export_model(spec, out_dir=out) for name, spec in ZOO.items()}


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the fixture package `my_pkg` importable, as a user's own package would be."""
    monkeypatch.syspath_prepend(str(USER_MODELS))
    return USER_MODELS
