"""The engines torchship serves on, each an `torchship.engines.base.Engine`: `engine_class("torchserve")` or `("ray")`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchship.engines.base import Engine

#: Engine name -> (module, class). Imported on demand: `python -m torchship.engines.ray.launcher` must not import itself twice.
ENGINES: dict[str, tuple[str, str]] = {
    "torchserve": ("torchship.engines.torchserve.launcher", "TorchServe"),
    "ray": ("torchship.engines.ray.launcher", "RayServe"),
}


def engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name]
    found: type[Engine] = getattr(importlib.import_module(module), cls)
    return found
