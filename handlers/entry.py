"""The handler file torch-model-archiver puts at the root of every torchship .mar (as torchship_entry.py).

TorchServe instantiates the one class defined in this module, then calls initialize(context) and handle(data, context).
The handler package travels beside this file as `torchship_handler/`. Before any of it runs, initialize() checks that
the package Python would import is the archive's own: TorchServe puts the caller's PYTHONPATH before the model
directory, so a package of the same name elsewhere would otherwise run in its place. A package found anywhere else
refuses the load (TORCHSHIP-LOAD-REFUSED). stdlib only until that check has passed.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

#: The handler package's name inside an archive (handlers/names.py: HANDLER_PACKAGE; not imported: see above).
PACKAGE = "torchship_handler"
LOAD_REFUSED_MARKER = "TORCHSHIP-LOAD-REFUSED"


def handler_origin(package: str = PACKAGE) -> Path | None:
    """The folder that holds the package `import package` would load, found without running any of its code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or spec.submodule_search_locations is None:
        return None  # not found, or a module of that name rather than the package
    return Path(spec.origin).resolve().parent.parent


def own_handler_class(model_dir: str | Path, package: str = PACKAGE) -> Any:
    """The archive's TorchshipHandler class, imported only when the package Python finds is the one in model_dir."""
    found, own = handler_origin(package), Path(model_dir).resolve()
    if found != own:
        where = f"in {found}" if found else "nowhere"
        raise RuntimeError(
            f"{LOAD_REFUSED_MARKER} {own.name}: the handler package {package} was found {where}, not in the archive's "
            f"model directory {own}; remove the other {package} from PYTHONPATH"
        )
    return importlib.import_module(f"{package}.service").TorchshipHandler


class EndpointHandler:
    """A torchship endpoint; all behaviour lives in the handler package's service module, which the Ray app runs too."""

    def __init__(self) -> None:
        self.initialized = False
        self.service: Any = None

    def initialize(self, context: Any) -> None:
        self.service = own_handler_class(context.system_properties["model_dir"])()
        self.service.initialize(context)
        self.initialized = True

    def handle(self, data: Any, context: Any) -> Any:
        if self.service is None:
            raise RuntimeError("handle() before initialize()")
        return self.service.handle(data, context)
