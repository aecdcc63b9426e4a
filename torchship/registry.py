"""Finding ModelSpecs: the zoo's by name, a user's by `package.module:ATTRIBUTE`."""

from __future__ import annotations

import importlib

from torchship.errors import SpecError
from torchship.spec import ModelSpec


def zoo() -> dict[str, ModelSpec]:
    from torchship.models import ZOO

    return dict(ZOO)


def load_spec(ref: str) -> ModelSpec:
    """Import `package.module:ATTRIBUTE` and return the ModelSpec it names."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"--spec {ref!r} must look like package.module:SPEC (a module path, a colon, an attribute)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(
            f"--spec {ref!r}: cannot import module {module_name!r} ({exc}). Run from the folder that holds it, "
            "or add that folder to PYTHONPATH, or install the package into this environment."
        ) from None
    except Exception as exc:  # user code raising at import
        raise SpecError(f"--spec {ref!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    try:
        spec = getattr(module, attr)
    except AttributeError:
        raise SpecError(f"--spec {ref!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"--spec {ref!r}: {attr!r} is a {type(spec).__name__}, not a torchship.spec.ModelSpec")
    return spec


def resolve(ref: str) -> ModelSpec:
    """A zoo model's name, or `package.module:ATTRIBUTE` for a user's spec."""
    if ":" in ref:
        return load_spec(ref)
    available = zoo()
    if ref not in available:
        raise SpecError(f"unknown model {ref!r}; the zoo has {sorted(available)} (or pass --spec module:SPEC)")
    return available[ref]


def select(names: list[str], spec_refs: list[str]) -> list[tuple[str, ModelSpec]]:
    """(reference, spec) for each model a command works on: the named zoo models plus the --spec ones, or the
    whole zoo if none is given. The reference (a zoo name or `module:SPEC`) lets a child process find it again."""
    available = zoo()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SpecError(f"unknown model(s) {unknown}; the zoo has {sorted(available)} (or pass --spec module:SPEC)")
    chosen = [(n, available[n]) for n in names] + [(r, load_spec(r)) for r in spec_refs]
    if not names and not spec_refs:
        chosen = list(available.items())
    seen: set[str] = set()
    for _, s in chosen:
        if s.name in seen:
            raise SpecError(f"model name {s.name!r} is given twice; every model needs its own name")
        seen.add(s.name)
    return chosen
