"""The engines torchship serves on, each an `engines.base.Engine`: `engine_class("torchserve")` or `("ray")`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.base import Engine

#: Engine name -> (module, class). Imported on demand: `python -m engines.ray` must not import itself twice.
ENGINES: dict[str, tuple[str, str]] = {"torchserve": ("engines.torchserve", "TorchServe"), "ray": ("engines.ray", "RayServe")}


def engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name]
    found: type[Engine] = getattr(importlib.import_module(module), cls)
    return found
