"""The handler side's exceptions, each carrying the HTTP status a client gets for it. stdlib only (travels in every
.mar). Project-side failures (the CLI's, with exit codes) are in torchship/errors.py."""

from __future__ import annotations

from .names import LOAD_REFUSED_MARKER

#: TorchServe's own status and wording for a missing or wrong token, so every engine has one access rule.
TOKEN_FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


class HandlerError(Exception):
    """Anything the handler raises on purpose; `status` is the HTTP status the request gets."""

    status = 500


class ClientError(HandlerError):
    """The client sent something we cannot serve."""

    status = 400


class BadRequest(ClientError):
    status = 400


class TokenRefused(ClientError):
    """No token, or the wrong one (TorchServe answers 400 here, not 401; both engines do the same)."""

    status = 400

    def __init__(self) -> None:
        super().__init__(TOKEN_FAILED)


class NotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class ArtifactError(HandlerError):
    """The archive is incomplete, was changed after it was built, or cannot be trusted: the endpoint must not load.

    The message starts with LOAD_REFUSED_MARKER, so an engine finds the reason in its log or deployment status.
    """

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(f"{LOAD_REFUSED_MARKER} {message}")


class HandlerMismatch(ArtifactError):
    """The archive carries different handler code than the Ray app runs: the engines would not serve alike."""


class UnsafeArchive(ArtifactError):
    """An archive entry would be written outside the folder it is unpacked into."""
