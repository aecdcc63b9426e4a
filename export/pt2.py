"""Eager -> torch.export ExportedProgram (.pt2) with the spec's dynamic dims, and optionally an AOTInductor package."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from torchship.errors import ExportFormatError
from torchship.spec import Dim, ModelSpec

AotiIsa = Literal["native", "avx2"]
#: Inductor settings per ISA choice. 'native' lets inductor pick this CPU's best vector ISA and compile with
#: -march=native (the package then needs that CPU); 'avx2' fixes 256-bit vectors and -march=x86-64-v3
#: (AVX2 + FMA), so the package runs on any x86-64 CPU from about 2015 on.
AOTI_CONFIG: dict[str, dict[str, object]] = {
    "native": {"cpp.simdlen": None, "cpp.march": None},
    "avx2": {"cpp.simdlen": 256, "cpp.march": "x86-64-v3"},
}


def dynamic_shapes(spec: ModelSpec) -> tuple[dict[int, torch.export.Dim], ...]:
    """One torch.export.Dim per distinct spec Dim (shared by name across inputs), positional like the inputs."""
    dims: dict[str, torch.export.Dim] = {}

    def export_dim(d: Dim) -> torch.export.Dim:
        if d.name not in dims:
            dims[d.name] = torch.export.Dim(d.name, min=d.min, max=d.max)
        return dims[d.name]

    return tuple({i: export_dim(d) for i, d in enumerate(t.shape) if isinstance(d, Dim)} for t in spec.inputs)


def build_pt2(spec: ModelSpec, model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export the model (or its spec's export rewrite) with dynamic dims."""
    target = spec.export_rewrite(model) if spec.export_rewrite is not None else model
    try:
        with torch.no_grad():
            return torch.export.export(target.eval(), example, dynamic_shapes=dynamic_shapes(spec), strict=False)
    except Exception as exc:  # torch.export raises many types; each becomes one actionable message
        raise ExportFormatError(
            spec.name,
            "pt2",
            f"torch.export failed: {type(exc).__name__}: {str(exc).strip()[:2000]}\n"
            "If forward branches on tensor data, give the spec an export_rewrite that computes the same thing with "
            "torch.cond or mask arithmetic; if a dynamic dim was specialised, widen or fix its bounds in the spec; "
            "or drop 'pt2' from the spec's formats.",
        ) from None


def save_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def build_aoti(spec: ModelSpec, program: torch.export.ExportedProgram, path: Path, *, isa: AotiIsa) -> None:
    """Compile an AOTInductor package with the local C++ compiler.

    The package does not check input shapes at run time, and it runs only on CPUs with the ISA it was built for:
    isa='avx2' builds a package for any x86-64 CPU with AVX2; 'native' uses the best ISA of this CPU.
    """
    # Imported here: inductor is heavy and only needed when AOTInductor is asked for.
    import torch._inductor

    try:
        with torch._inductor.config.patch(AOTI_CONFIG[isa]):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # inductor/compiler failures come in many types
        raise ExportFormatError(
            spec.name,
            "aoti",
            f"AOTInductor compilation failed: {type(exc).__name__}: {str(exc).strip()[:2000]}\n"
            "It needs a working C++ compiler (g++ or clang) on PATH; check `g++ --version`, or export without --aoti.",
        ) from None
