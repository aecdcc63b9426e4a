"""What a request and its answer are on the wire, without torch: the plain request and reply every engine adapter
passes to and from `EndpointCore`, JSON bodies and errors, the binary extension's split, the inference token and the
Server-Timing header.

stdlib only: it travels inside every .mar with the rest of the handler package. Processes that route requests but run
no model (the Ray ingress and gRPC servicer, the Ray app's builder) import this module and never torch, which would
cost each of them about 180 MiB and a second of start-up.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRequest, ClientError
from .names import BEARER_PREFIX, PARITY_PROBE_ENV, PARITY_PROBE_KEY, TOKEN_ENV, TOKEN_FILE_ENV

JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
EMPTY_BODY = "body is empty; POST an OIP v2 inference request"


def _reject_constant(name: str) -> float:
    raise BadRequest(f"JSON contains {name}, which is not valid JSON; send finite numbers")


def parse_json(raw: bytes | bytearray | str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 text; send JSON, or the binary extension with its header") from None
    except RecursionError:
        raise BadRequest("JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def split_body(body: bytes | bytearray | str | Mapping[str, Any], header_length: str | None) -> tuple[Any, bytes]:
    """(JSON header object, binary tail). With the binary extension the first header_length bytes are JSON."""
    if header_length is None:
        if isinstance(body, Mapping):
            return body, b""
        if isinstance(body, (bytes, bytearray)) and not body:
            raise BadRequest(EMPTY_BODY)
        return parse_json(body), b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if not isinstance(raw, (bytes, bytearray)):
        raise BadRequest("the binary extension needs a raw body (Content-Type: application/octet-stream)")
    if not 0 < n <= len(raw):
        raise BadRequest(f"Inference-Header-Content-Length is {n} but the body has {len(raw)} bytes")
    return parse_json(raw[:n]), bytes(raw[n:])


#: Where the shared inference token comes from when the engine itself cannot take one (TorchServe in Kubernetes
#: generates its own random keys per pod, so a Secret's token is checked here; the Ray ingress uses the same).
def inference_token(environ: Mapping[str, str]) -> str | None:
    """The token from TORCHSHIP_INFERENCE_TOKEN, or from the file TORCHSHIP_INFERENCE_TOKEN_FILE names; None if unset."""
    if token := environ.get(TOKEN_ENV, "").strip():
        return token
    if path := environ.get(TOKEN_FILE_ENV):
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return None


def token_matches(authorization: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    given = authorization or ""
    return given.startswith(BEARER_PREFIX) and hmac.compare_digest(given[len(BEARER_PREFIX) :].encode(), token.encode())


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def server_timing(phases: Mapping[str, float]) -> str:
    """A W3C Server-Timing value: `decode;dur=0.052, model;dur=0.410, ...` (milliseconds)."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in phases.items())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """The phases of a Server-Timing value (the inverse of `server_timing`; unknown parts are skipped)."""
    phases: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            phases[name] = float(rest)
        except ValueError:
            continue
    return phases


def probe_interval_s(environ: Mapping[str, str], model_config: Mapping[str, Any] | None) -> float:
    """Seconds between reference re-runs while serving: PARITY_PROBE_ENV, else the model config's
    parityProbeIntervalS, else 0 (no probe)."""
    raw = environ.get(PARITY_PROBE_ENV, "").strip() or (model_config or {}).get(PARITY_PROBE_KEY) or 0
    try:
        interval = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{PARITY_PROBE_ENV} / {PARITY_PROBE_KEY} must be a number of seconds, got {raw!r}") from None
    if interval < 0:
        raise ValueError(f"{PARITY_PROBE_ENV} / {PARITY_PROBE_KEY} must be 0 (off) or more, got {interval:g}")
    return interval


@dataclass(frozen=True)
class Request:
    """One request as the engine received it: the body (bytes, or a JSON document the engine already parsed; None
    when there was none) and the headers, names lower-cased."""

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Any, headers: Mapping[str, Any] | None) -> Request:
        return cls(body, {str(k).lower(): str(v) for k, v in (headers or {}).items()})


@dataclass(frozen=True)
class Reply:
    """One answer: HTTP status, body, and headers (content-type included)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", JSON_TYPE)

    @classmethod
    def error(cls, exc: ClientError | str, status: int | None = None) -> Reply:
        code = status if status is not None else getattr(exc, "status", 500)
        return cls(code, encode_error(str(exc)), {"content-type": JSON_TYPE})
