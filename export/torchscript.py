"""Eager -> frozen TorchScript by the spec's method (trace, script or hybrid), with evidence of what freezing did."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from torchship.errors import ExportFormatError
from torchship.manifest import GraphStats
from torchship.spec import ModelSpec

#: What freezing runs: inline, fold parameters into constants, then the frozen-graph optimisations
#: (conv+bn / conv+add / conv+mul folding, dropout removal, linear pre-transpose).
FREEZE_PASSES = ["torch.jit.freeze", "optimize_numerics (conv-bn/add/mul folding, dropout removal)"]
#: Ops whose counts the manifest records before and after freezing.
TRACKED_OPS = ("aten::batch_norm", "aten::_convolution", "aten::conv2d", "aten::linear", "aten::dropout", "prim::GetAttr")


@dataclass(frozen=True)
class TorchScriptResult:
    module: torch.jit.ScriptModule
    passes: list[str]
    graph: GraphStats


def _trace_strict(module: nn.Module, example: tuple[torch.Tensor, ...], *, what: str, spec: ModelSpec) -> torch.jit.ScriptModule:
    """Trace, treating any TracerWarning as a failed trace: it means the graph silently froze some Python value."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
    tracer_warnings = [w for w in caught if issubclass(w.category, TracerWarning)]
    for w in caught:  # everything else (TorchScript's deprecation notices, say) stays visible
        if w not in tracer_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if tracer_warnings:
        first = str(tracer_warnings[0].message).strip()
        raise ExportFormatError(
            spec.name,
            "torchscript",
            f"tracing {what} raised {len(tracer_warnings)} TracerWarning(s), so the trace would not be faithful: "
            f"{first}\nIt has control flow that depends on tensor data or on arguments; script it instead "
            "(export_method='script', or 'hybrid' with only the control-flow-free submodules in trace_submodules).",
        )
    assert isinstance(traced, torch.jit.ScriptModule)
    return traced


def _capture_submodule_inputs(
    model: nn.Module, names: tuple[str, ...], example: tuple[torch.Tensor, ...]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Run the model once and record the positional inputs each named submodule receives."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name in names:
        sub = model.get_submodule(name)

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], _name: str = name) -> None:
            seen.setdefault(_name, tuple(a.detach().clone() for a in args))

        handles.append(sub.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def to_script(spec: ModelSpec, model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    if spec.export_method == "trace":
        return _trace_strict(model, example, what="the model", spec=spec)
    work = copy.deepcopy(model).eval()
    if spec.export_method == "hybrid":
        inputs = _capture_submodule_inputs(work, spec.trace_submodules, example)
        for name in spec.trace_submodules:
            if name not in inputs:
                raise ExportFormatError(
                    spec.name, "torchscript", f"submodule {name!r} was never called by forward; fix trace_submodules"
                )
            _set_submodule(
                work, name, _trace_strict(work.get_submodule(name), inputs[name], what=f"submodule {name!r}", spec=spec)
            )
    scripted = torch.jit.script(work)
    assert isinstance(scripted, torch.jit.ScriptModule)
    return scripted


def _op_counts(graph: torch.Graph) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in graph.nodes():
        counts[node.kind()] += 1
        for block in node.blocks():
            for inner in block.nodes():
                counts[inner.kind()] += 1
    return counts


def build_torchscript(spec: ModelSpec, model: nn.Module, example: tuple[torch.Tensor, ...]) -> TorchScriptResult:
    """Build the frozen TorchScript module for a spec (not yet saved)."""
    try:
        scripted = to_script(spec, model, example).eval()
    except ExportFormatError:
        raise
    except Exception as exc:  # torch raises many types here; each becomes one actionable message
        hint = (
            "Tracing failed: make forward take and return tensors only, or script it (export_method='script')."
            if spec.export_method == "trace"
            else "Scripting failed: TorchScript needs type annotations and a supported subset of Python; "
            "see the error above, or trace the control-flow-free parts (export_method='hybrid')."
        )
        raise ExportFormatError(spec.name, "torchscript", f"{type(exc).__name__}: {exc}\n{hint}") from None
    before = _op_counts(scripted.inlined_graph)
    frozen = torch.jit.freeze(scripted, preserved_attrs=list(spec.preserved_methods))
    after = _op_counts(frozen.graph)
    graph = GraphStats(
        nodes_before_freeze=sum(before.values()),
        nodes_after_freeze=sum(after.values()),
        ops_before_freeze={op: before[op] for op in TRACKED_OPS if before[op]},
        ops_after_freeze={op: after[op] for op in TRACKED_OPS if after[op]},
    )
    return TorchScriptResult(module=frozen, passes=[spec.export_method, *FREEZE_PASSES], graph=graph)
