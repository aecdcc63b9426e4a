"""The Ray app's archive cache: no entry outside it, and no archive whose handler code differs from the app's."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive
from torchship.engines.ray.app import check_same_handler
from torchship.handlers.errors import HandlerMismatch, UnsafeArchive
from torchship.handlers.names import HANDLER_PACKAGE


@pytest.mark.parametrize("entry", ["../escape.txt", "/abs/path.txt", "torchship_handler/../../up.txt", "a\\\\..\\\\b.txt"])
def test_entries_outside_the_cache_are_refused(tmp_path: Path, entry: str) -> None:
    mar = tmp_path / "evil.mar"
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("manifest.json", "{}")
        z.writestr(entry, "boom")
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchive, match="outside the cache"):
        MarArchive(mar).unpack_cached(cache)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "up.txt").exists()
    assert list(cache.iterdir()) == []  # nothing half-unpacked is kept


def test_unpack_is_cached_by_content(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    first = MarArchive(archives["dynamic_router"].mar).unpack_cached(tmp_path)
    second = MarArchive(archives["dynamic_router"].mar).unpack_cached(tmp_path)
    assert first == second and (first / "manifest.json").is_file()
    check_same_handler(first)  # built by this torchship: accepted


def test_an_archive_with_other_handler_code_is_refused(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    model_dir = MarArchive(archives["dynamic_router"].mar).unpack_cached(tmp_path)
    service = model_dir / HANDLER_PACKAGE / "service.py"
    service.write_text(service.read_text() + "\n# patched\n")
    with pytest.raises(HandlerMismatch, match="rebuild the archives"):
        check_same_handler(model_dir)
