"""Hostile input against a running engine: the corpus (reliability/corpus.yaml) and a bounded HTTP fuzz.

Every case must get its declared 4xx with a JSON error body, and the next valid request must still return outputs
equal to eager. Requests go out through http.client so that paths, methods and headers reach the server exactly
as written (no URL normalisation, no added Content-Type).
"""

from __future__ import annotations

import http.client
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from torchship.errors import CorpusError
from torchship.handlers.codec import Signature, decode_request, encode_request
from torchship.handlers.errors import ClientError
from torchship.handlers.names import bearer
from torchship.spec import ModelSpec, Tolerance
from torchship.verify.load import HttpReply, expect_outputs

CORPUS = Path(__file__).resolve().with_name("corpus.yaml")
#: The request sent after every hostile case: the server must still answer it with the eager outputs.
HEALTH_ENDPOINT = "dynamic_router"
AuthKind = Literal["valid", "none", "wrong", "basic", "lowercase", "empty"]
#: The two inference paths a case can be sent to when it names no `path`: TorchServe's and OIP v2's.
ROUTES = {"predictions": "/predictions/{endpoint}", "oip": "/v2/models/{endpoint}/infer"}
RouteKind = Literal["predictions", "oip"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidBody(_Strict):
    """A valid request for the case's endpoint, then edited: `set` and `delete` take paths like `inputs/0/shape`."""

    batch: int = 1
    set: dict[str, Any] = Field(default_factory=dict)
    delete: list[str] = Field(default_factory=list)
    #: Raw JSON text put in place of the first data value (NaN, Infinity, 1e400: what json.dumps will not write).
    token: str | None = None
    #: Pad the body with spaces to this many bytes past the size limit.
    over_limit_bytes: int | None = None


class BinaryBody(_Strict):
    """A valid binary-extension request, then made to lie: header length, sizes, tail."""

    batch: int = 1
    set: dict[str, Any] = Field(default_factory=dict)
    #: The Inference-Header-Content-Length to send: an integer offset from the true length ("+7", "-3") or a literal.
    header_length: str | None = None
    extra_tail_bytes: int = 0
    truncate_tail_bytes: int = 0
    nan: bool = False


class NestedBody(_Strict):
    depth: int
    kind: Literal["array", "object"] = "array"


class BodySpec(_Strict):
    raw: str | None = None
    hex: str | None = None
    json_doc: Any = Field(default=None, alias="json")
    valid: ValidBody | None = None
    binary: BinaryBody | None = None
    nested: NestedBody | None = None


class Case(_Strict):
    id: str
    group: str
    status: int
    endpoint: str = HEALTH_ENDPOINT
    method: str = "POST"
    #: The request path exactly as sent; default the `route`'s path for the endpoint.
    path: str | None = None
    route: RouteKind = "predictions"
    #: Extra headers; a null value removes a default one (Content-Type).
    headers: dict[str, str | None] = Field(default_factory=dict)
    auth: AuthKind = "valid"
    body: BodySpec | None = None


def load_corpus(path: Path = CORPUS) -> list[Case]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cases = [Case.model_validate(item) for item in raw["cases"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValidationError) as exc:
        raise CorpusError(f"cannot read the hostile corpus {path}: {exc}") from None
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{path}: case ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return cases


@dataclass(frozen=True)
class Target:
    """One running engine: where to send requests and the inference token it expects."""

    engine: str
    url: str
    token: str | None


def send(
    target: Target, method: str, path: str, body: bytes | None, headers: Mapping[str, str], *, timeout_s: float = 60
) -> HttpReply:
    """One request, sent byte for byte as given."""
    parts = urlsplit(target.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return HttpReply(response.status, data, {k.lower(): v for k, v in response.getheaders()})
    finally:
        conn.close()


def _auth_header(kind: AuthKind, token: str | None) -> dict[str, str]:
    real = token or ""
    table = {
        "valid": bearer(token),
        "none": {},
        "wrong": {"Authorization": "Bearer not-the-token"},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "lowercase": {"Authorization": f"bearer {real}"},
        "empty": {"Authorization": "Bearer "},
    }
    return table[kind]


def auth_headers(target: Target) -> dict[str, str]:
    """The Authorization header a valid request to this target carries (none when it has no token)."""
    return _auth_header("valid", target.token)


def _edit(doc: Any, path: str, value: Any = None, *, delete: bool = False) -> None:
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in path.split("/")]
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


def build_body(
    case: Case, make_inputs: Callable[[str, int], dict[str, torch.Tensor]], limit_bytes: int
) -> tuple[bytes | None, dict[str, str]]:
    """The body and the default headers of one case."""
    spec = case.body
    if spec is None:
        return None, {}
    json_ct = {"Content-Type": "application/json"}
    if spec.raw is not None:
        return spec.raw.encode("utf-8"), json_ct
    if spec.hex is not None:
        return bytes.fromhex(spec.hex), json_ct
    if spec.nested is not None:
        d = spec.nested.depth
        inner = "[" * d + "]" * d if spec.nested.kind == "array" else '{"a":' * d + "1" + "}" * d
        text = '{"inputs":[{"name":"x","shape":[1,256],"datatype":"FP32","data":' + inner + "}]}"
        return text.encode("utf-8"), json_ct
    if spec.valid is not None:
        v = spec.valid
        body, _ = encode_request(make_inputs(case.endpoint, v.batch))
        doc = json.loads(body)
        for key, value in v.set.items():
            _edit(doc, key, value)
        for key in v.delete:
            _edit(doc, key, delete=True)
        if v.token is not None:
            doc["inputs"][0]["data"][0] = "__TOKEN__"
        text = json.dumps(doc, separators=(",", ":"))
        if v.token is not None:
            text = text.replace('"__TOKEN__"', v.token, 1)
        raw = text.encode("utf-8")
        if v.over_limit_bytes is not None:
            raw += b" " * (limit_bytes + v.over_limit_bytes - len(raw))
        return raw, json_ct
    if spec.binary is not None:
        return _binary_body(spec.binary, make_inputs(case.endpoint, spec.binary.batch))
    return json.dumps(spec.json_doc).encode("utf-8"), json_ct


def _binary_body(b: BinaryBody, inputs: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, str]]:
    if b.nan:
        inputs = {k: v.clone() for k, v in inputs.items()}
        next(iter(inputs.values())).view(-1)[0] = float("nan")
    body, headers = encode_request(inputs, binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    doc, tail = json.loads(body[:n]), body[n:]
    for key, value in b.set.items():
        _edit(doc, key, value)
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    tail = tail[: len(tail) - b.truncate_tail_bytes] + b"\0" * b.extra_tail_bytes
    length = str(len(header))
    if b.header_length is not None:
        h = b.header_length
        length = str(len(header) + int(h)) if h[:1] in "+-" and h[1:].isdigit() else h
    return header + tail, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length}


def case_request(
    case: Case, target: Target, make_inputs: Callable[[str, int], dict[str, torch.Tensor]], limit_bytes: int
) -> tuple[str, str, bytes | None, dict[str, str]]:
    body, headers = build_body(case, make_inputs, limit_bytes)
    merged: dict[str, str | None] = {**headers, **_auth_header(case.auth, target.token), **case.headers}
    final = {k: v for k, v in merged.items() if v is not None}
    return case.method, case.path or ROUTES[case.route].format(endpoint=case.endpoint), body, final


def error_message(reply: HttpReply) -> str | None:
    """The error text of a JSON error body ({"error": ...}, or TorchServe's own {"message": ...}), else None."""
    try:
        doc = json.loads(reply.body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    message = doc.get("error", doc.get("message"))
    return message if isinstance(message, str) and message else None


class Oracle:
    """Seeded inputs for every served endpoint and the eager outputs they must produce."""

    def __init__(
        self, models: Mapping[str, str], tolerances: Mapping[str, Tolerance], specs: Mapping[str, ModelSpec] | None = None
    ) -> None:
        from torchship.models import ZOO

        zoo = {**ZOO, **(specs or {})}  # `specs`: other versions of zoo models, by model name
        self.models = dict(models)
        self.tolerances = dict(tolerances)
        self._specs = {ep: zoo[m] for ep, m in models.items()}
        self._eager = {m: zoo[m].factory() for m in set(models.values())}

    def inputs(self, endpoint: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return self._specs[endpoint].make_inputs(batch, seed_offset=10_000 + seed)

    def eager(self, endpoint: str, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from torchship.spec import as_output_tuple

        spec = self._specs[endpoint]
        with torch.no_grad():
            return as_output_tuple(self._eager[spec.name](*(inputs[t.name] for t in spec.inputs)), spec)

    def output_names(self, endpoint: str) -> list[str]:
        return [t.name for t in self._specs[endpoint].outputs]

    def check(self, endpoint: str, inputs: Mapping[str, torch.Tensor], reply: HttpReply) -> str:
        """'' when the reply is a 200 whose outputs equal eager within tolerance, else why not."""
        return expect_outputs(self.output_names(endpoint), self.eager(endpoint, inputs), self.tolerances[endpoint])(reply)


def healthy(target: Target, oracle: Oracle, seed: int) -> str:
    """'' when a valid request to the health endpoint is answered with the eager outputs."""
    inputs = oracle.inputs(HEALTH_ENDPOINT, 2, seed)
    body, headers = encode_request(inputs)
    try:
        reply = send(target, "POST", f"/predictions/{HEALTH_ENDPOINT}", body, {**headers, **auth_headers(target)})
    except OSError as exc:
        return f"no answer: {exc}"
    return oracle.check(HEALTH_ENDPOINT, inputs, reply)


@dataclass(frozen=True)
class CaseResult:
    engine: str
    case: str
    group: str
    expected: int
    status: int
    json_error: bool
    healthy_after: bool
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == self.expected and self.json_error and self.healthy_after


def run_corpus(target: Target, cases: Sequence[Case], oracle: Oracle, *, limit_bytes: int) -> list[CaseResult]:
    """Send every case, then a valid request; one result per case."""
    results: list[CaseResult] = []
    for i, case in enumerate(cases):
        method, path, body, headers = case_request(case, target, oracle.inputs, limit_bytes)
        try:
            reply = send(target, method, path, body, headers)
            status, message = reply.status, error_message(reply)
        except OSError as exc:
            status, message = 0, f"no answer: {exc}"
        after = healthy(target, oracle, seed=i)
        detail = (message or "")[:300] if status else str(message)
        results.append(
            CaseResult(
                target.engine,
                case.id,
                case.group,
                case.status,
                status,
                message is not None,
                not after,
                detail + (f"; after: {after}" if after else ""),
            )
        )
    return results


# -- fuzz ----------------------------------------------------------------------------------------------------------

_JUNK_VALUES: tuple[Any, ...] = (None, True, -1, 0, 2**63, 1.5, -1e308, "", "x" * 50, [], {}, [[1]], {"a": 1}, "NaN")


def _mutate_doc(doc: Any, rng: random.Random) -> Any:
    """Replace, delete or duplicate one random node of a JSON document."""
    paths: list[list[str | int]] = []

    def walk(node: Any, path: list[str | int]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for idx, v in enumerate(node[:4]):  # data arrays are long; their first few entries stand for the rest
                walk(v, [*path, idx])

    walk(doc, [])
    if len(paths) == 1:  # an earlier edit left no container to edit inside
        return rng.choice(_JUNK_VALUES)
    path = rng.choice(paths[1:])
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(("replace", "delete", "duplicate"))
    if action == "delete":
        del parent[path[-1]]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[int(path[-1])])
    else:
        parent[path[-1]] = rng.choice(_JUNK_VALUES)
    return doc


def fuzz_body(rng: random.Random, valid: bytes) -> tuple[bytes, dict[str, str]]:
    """One mutated request: structural JSON edits, byte flips, truncation, or lying binary headers."""
    kind = rng.choice(("structure", "structure", "bytes", "truncate", "binary"))
    ct = {"Content-Type": "application/json"}
    if kind == "structure":
        doc = json.loads(valid)
        for _ in range(rng.randint(1, 3)):
            doc = _mutate_doc(doc, rng)
        return json.dumps(doc).encode("utf-8"), ct
    if kind == "bytes":
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), ct
    if kind == "truncate":
        return valid[: rng.randrange(len(valid))], ct
    doc = json.loads(valid)
    numel = math.prod(doc["inputs"][0]["shape"])
    data = doc["inputs"][0].pop("data")
    doc["inputs"][0]["parameters"] = {"binary_data_size": rng.choice((numel * 4, numel * 4 + 4, numel * 4 - 4, 0, -4))}
    header = json.dumps(doc).encode("utf-8")
    tail = torch.tensor(data, dtype=torch.float32).numpy().tobytes()[: rng.randrange(numel * 4 + 1)]
    length = rng.choice((len(header), len(header) + rng.randint(-20, 20), 0, len(header) + len(tail) + 1))
    return header + tail, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}


@dataclass
class FuzzResult:
    engine: str
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    no_answer: list[str] = field(default_factory=list)
    healthy_after: bool = False
    duration_s: float = 0.0


def run_fuzz(
    target: Target, oracle: Oracle, signature: Signature, *, requests: int, seed: int, timeout_s: float = 30
) -> FuzzResult:
    """Send `requests` mutated bodies; a 200 is checked against eager on what the codec decodes from the same body."""
    rng = random.Random(seed)
    result = FuzzResult(target.engine)
    start = time.monotonic()
    auth = auth_headers(target)
    for i in range(requests):
        inputs = oracle.inputs(HEALTH_ENDPOINT, rng.randint(1, 3), seed=i)
        body, headers = fuzz_body(rng, encode_request(inputs)[0])
        try:
            reply = send(target, "POST", f"/predictions/{HEALTH_ENDPOINT}", body, {**headers, **auth}, timeout_s=timeout_s)
        except OSError as exc:
            result.no_answer.append(f"#{i}: {exc}")
            continue
        result.requests += 1
        result.by_status[reply.status] = result.by_status.get(reply.status, 0) + 1
        if reply.status >= 500:
            result.server_errors.append(f"#{i}: {reply.status} {reply.body[:200]!r}")
        elif reply.status == 200:
            # The mutation left a valid request: the answer must be eager's on exactly what was sent.
            try:
                sent = decode_request(body, signature, header_length=headers.get("Inference-Header-Content-Length"))
            except ClientError as exc:
                result.wrong_answers.append(f"#{i}: served a request the codec refuses ({exc})")
                continue
            if problem := oracle.check(HEALTH_ENDPOINT, sent.inputs, reply):
                result.wrong_answers.append(f"#{i}: {problem}")
        elif error_message(reply) is None:
            result.server_errors.append(f"#{i}: {reply.status} without a JSON error: {reply.body[:200]!r}")
    result.healthy_after = healthy(target, oracle, seed=requests) == ""
    result.duration_s = time.monotonic() - start
    return result
