"""The handler file torch-model-archiver puts at the root of every torchship .mar (as torchship_handler.py).

TorchServe instantiates the one class defined in this module, then calls initialize(context) and handle(data, context).
"""

from handlers.service import TorchshipHandler


class EndpointHandler(TorchshipHandler):
    """A torchship endpoint; all behaviour lives in handlers.service so the Ray app runs the same code."""
