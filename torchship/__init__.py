"""torchship: eager PyTorch to served REST endpoints, with outputs proven equal to eager."""

__version__ = "0.1.0"
