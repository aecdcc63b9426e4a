"""Finding a Java 17+ for TorchServe."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchship.engines.torchserve.java import find_java, java_home, java_major


def _fake_java(tmp_path: Path, version_line: str) -> Path:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir(parents=True, exist_ok=True)
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return java


@pytest.mark.parametrize(
    ("line", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_402"', 8),
        ("no version here", None),
    ],
)
def test_java_major_parses_what_java_prints(tmp_path: Path, line: str, major: int | None) -> None:
    assert java_major(_fake_java(tmp_path, line)) == major


def test_java_home_prefers_a_recent_enough_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _fake_java(tmp_path / "old", 'java version "1.8.0_402"')
    new = _fake_java(tmp_path / "new", 'openjdk version "21.0.2"')
    monkeypatch.setenv("JAVA_HOME", str(old.parent.parent))
    monkeypatch.setenv("PATH", str(new.parent))
    found = find_java()
    assert found == new
    assert java_home(new) == (tmp_path / "new").resolve()
