"""The exception types every stage raises; each message tells the user what to do next."""

from __future__ import annotations


class TorchshipError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback."""


class SpecError(TorchshipError):
    """A model spec could not be found, imported or validated."""


class ManifestError(TorchshipError):
    """A manifest.json is missing, malformed or does not match its artifacts."""


class ExportFormatError(TorchshipError):
    """One format of one model could not be exported or failed its parity gate."""

    def __init__(self, model: str, fmt: str, message: str) -> None:
        super().__init__(f"[{model}] {fmt}: {message}")
        self.model = model
        self.fmt = fmt
        self.detail = message


class OutputDirError(TorchshipError):
    """The output folder cannot be created or written."""
