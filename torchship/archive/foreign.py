"""Archives torchship did not build: any `.mar` whose own handler (a file in the archive, `module:function`, or one of
TorchServe's default handlers by name) serves it, as TorchServe's Python worker would run it.

What both engines need before such an archive loads: a check that names, in one sentence, what would stop it loading
(`preflight`), and the OIP v2 model metadata they answer for it (`oip_metadata`: the archive says nothing of its
tensors, so one BYTES input and output of unknown length). stdlib only, plus `packaging` (Ray's and pip's dependency).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

from torchship.archive.mar import MarArchive
from torchship.handlers.names import LOAD_REFUSED_MARKER

#: Where TorchServe's default handlers live: a MANIFEST handler that is no file of the archive names one of them.
DEFAULT_HANDLERS = "ts.torch_handler"
#: The platform both engines report for a foreign archive's model metadata.
PLATFORM = "torchserve_handler"


def handler_module(handler: str) -> str:
    """The module a MANIFEST's handler names, as TorchServe's model loader reads it (`dir/name.py:function` -> name)."""
    module = handler.split(":", 1)[0]
    module = module.removesuffix(".py")
    return module.split("/")[-1]


def _in_archive(mar: MarArchive, module: str) -> bool:
    return f"{module}.py" in mar.names or f"{module}/__init__.py" in mar.names


def handler_spec(mar: MarArchive) -> str:
    """The handler as the MANIFEST names it; ValueError when it names none."""
    handler = str(mar.mar_manifest.get("model", {}).get("handler") or "")
    if not handler:
        raise ValueError("its MAR-INF/MANIFEST.json names no handler")
    return handler


def missing_requirements(lines: str) -> list[str]:
    """The requirements (a requirements.txt's text) this environment does not satisfy; options and comments skipped."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing: list[str] = []
    for raw in lines.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            missing.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(f"{line} (installed: {installed})")
    return missing


def preflight(mar: MarArchive) -> str | None:
    """Why a foreign archive cannot load, in one sentence, found without running any of its code; None when nothing
    is known to stop it. TorchServe would start such an archive's workers and let them fail in a loop (or, for a
    requirements.txt, ignore it unless install_py_dep_per_model is set): both engines refuse it instead."""
    try:
        handler = handler_spec(mar)
    except ValueError as exc:
        return str(exc)
    module = handler_module(handler)
    if not _in_archive(mar, module) and importlib.util.find_spec(f"{DEFAULT_HANDLERS}.{module}") is None:
        return f"its handler {handler!r} is neither a file in the archive nor one of TorchServe's default handlers"
    model = mar.mar_manifest.get("model", {})
    for key in ("serializedFile", "modelFile"):
        named = model.get(key)
        if named and named not in mar.names:
            return f"its {key} {named!r} is named in MAR-INF/MANIFEST.json but is not in the archive"
    requirements = model.get("requirementsFile")
    listed = mar.read(requirements).decode("utf-8", errors="replace") if requirements in mar.names else ""
    if missing := missing_requirements(listed):
        return (
            f"its {requirements} needs {', '.join(missing)}, which this environment does not have "
            "(install it where the server runs; torchship installs nothing at load)"
        )
    return None


def refusal(endpoint: str, cause: str) -> str:
    """The line an engine reports for an endpoint that will not load: the marker, the endpoint, one sentence."""
    return f"{LOAD_REFUSED_MARKER} {endpoint}: {cause}"


def oip_metadata(name: str, version: str) -> dict[str, Any]:
    """`GET /v2/models/<name>` for a foreign archive, on both engines (TorchServe's OIP agent builds the same)."""
    tensor = {"datatype": "BYTES", "shape": [-1]}
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": "body", **tensor}],
        "outputs": [{"name": "output", **tensor}],
    }
