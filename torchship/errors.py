"""Every failure the project side reports, in one hierarchy: each class carries the CLI's exit code and, where a
server answered, the HTTP status. Each message tells the user what to do next. The handler side (torch + stdlib,
inside every .mar) has its own, with HTTP statuses: handlers/errors.py."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class TorchshipError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback and exits with `exit_code`."""

    exit_code = EXIT_FAILED


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


class ArchiveError(TorchshipError):
    """An archive could not be built or read."""


class SignatureRefused(ArchiveError):
    """A verify key is configured and an archive is unsigned, signed by another key, or changed after signing."""


class EngineError(TorchshipError):
    """An engine could not be started, did not become ready, or refused to load an archive."""


class NotReady(TorchshipError):
    """The server is up but not serving yet, or not answering; the message says which."""


class EndpointError(TorchshipError):
    """The server answered with an error status (`status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class DeployError(TorchshipError):
    """A Kubernetes step (render, validate, apply) failed."""


class CorpusError(TorchshipError):
    """The hostile corpus file is malformed."""


class ReliabilityError(TorchshipError):
    """A reliability run could not be carried out (an engine did not start, say)."""


class ConfigError(TorchshipError):
    """A settings file the command needs is missing or unreadable (the message names it and where it was looked for)."""

    exit_code = EXIT_USAGE
