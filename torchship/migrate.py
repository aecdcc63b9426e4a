"""`torchship migrate`: a model store served on TorchServe and then on Ray Serve, the same requests sent to each (one
at a time, then all at once so that batches form), and every answer compared: status, the headers the handler set
(content type included), and the body (JSON within a float tolerance, anything else byte for byte).

Produces migrate.json and migrate.md, one row per request and mode, each difference named.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchship.archive.mar import MarArchive, store_archives
from torchship.errors import EngineError, TorchshipError
from torchship.handlers.names import BATCH_REQUESTS_HEADER, BATCH_ROWS_HEADER, NODE_HEADER, TIMING_HEADER

ENGINES = ("torchserve", "ray")
MODES = ("one at a time", "all at once")
#: At most this many clients send the "all at once" round.
MAX_CLIENTS = 32
#: Headers the server adds, not the handler: left out of the comparison (lower-case). TorchServe's frontend adds
#: the first five; torchship's own archives add their batch sizes, timings and the Ray node, which differ by design.
SERVER_HEADERS = frozenset(
    {"x-request-id", "pragma", "cache-control", "expires", "connection", "content-length", "date", "server",
     "transfer-encoding", "keep-alive", "retry-after"}
    | {h.lower() for h in (BATCH_REQUESTS_HEADER, BATCH_ROWS_HEADER, NODE_HEADER, TIMING_HEADER)}
)  # fmt: skip
HEADERS_SUFFIX = ".headers.json"


@dataclass(frozen=True)
class MigrateRequest:
    """One request body for /predictions/<model>, with its headers."""

    model: str
    name: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Why there is no HTTP answer ("" when there is one).
    failure: str = ""


@dataclass
class MigrateRow:
    model: str
    request: str
    mode: str
    answers: dict[str, Answer]
    differences: list[str] = field(default_factory=list)


@dataclass
class MigrateResult:
    rows: list[MigrateRow]
    #: {engine: {endpoint: refusal line}}
    refused: dict[str, dict[str, str]]
    #: Foreign archives nothing was sent to (no requests for them).
    unsent: list[str]

    @property
    def differences(self) -> int:
        return sum(bool(r.differences) for r in self.rows)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.differences and not any(self.refused.values())


def read_requests(folder: Path) -> list[MigrateRequest]:
    """One sub-folder per model; each file is one body, with `<file>.headers.json` beside it (optional)."""
    if not folder.is_dir():
        raise TorchshipError(f"no requests folder {folder}")
    found: list[MigrateRequest] = []
    for model_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(HEADERS_SUFFIX)):
            headers_file = path.with_name(path.name + HEADERS_SUFFIX)
            headers: dict[str, str] = {}
            if headers_file.is_file():
                try:
                    doc = json.loads(headers_file.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise TorchshipError(f"{headers_file} is not JSON: {exc}") from None
                if not isinstance(doc, dict):
                    raise TorchshipError(f"{headers_file} must hold one JSON object of header names to values")
                headers = {str(k): str(v) for k, v in doc.items()}
            found.append(MigrateRequest(model_dir.name, path.name, path.read_bytes(), headers))
    if not found:
        raise TorchshipError(f"{folder} holds no requests (one folder per model, one file per request body)")
    return found


def reference_requests(archives: list[MarArchive]) -> tuple[list[MigrateRequest], list[str]]:
    """torchship archives' own reference inputs as requests, and the foreign archives that have none."""
    from torchship.handlers.codec import encode_request

    found: list[MigrateRequest] = []
    unsent: list[str] = []
    for mar in archives:
        if not mar.is_torchship:
            unsent.append(mar.path.stem)
            continue
        for i, case in enumerate(mar.references()):
            body, headers = encode_request(case["inputs"])
            found.append(MigrateRequest(mar.path.stem, f"reference-{i}", body, headers))
    return found, unsent


def handler_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in SERVER_HEADERS}


def json_differences(a: Any, b: Any, atol: float, where: str = "$") -> list[str]:
    """Where two JSON documents differ: numbers beyond atol, anything else not equal."""
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol):
            return []
        return [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in json_differences(a[k], b[k], atol, f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in json_differences(x, y, atol, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def body_differences(a: bytes, b: bytes, atol: float) -> list[str]:
    try:
        doc_a, doc_b = json.loads(a), json.loads(b)
    except ValueError:
        return [] if a == b else [f"body: {len(a)} bytes != {len(b)} bytes, not byte for byte equal"]
    return [f"body {d}" for d in json_differences(doc_a, doc_b, atol)]


def compare_answers(ts: Answer, ray: Answer, atol: float) -> list[str]:
    """Every way Ray Serve's answer differs from TorchServe's (empty: the same answer)."""
    if ts.failure or ray.failure:
        return [f"{engine}: {a.failure}" for engine, a in (("torchserve", ts), ("ray", ray)) if a.failure]
    if ts.status != ray.status:
        return [f"status {ts.status} on TorchServe, {ray.status} on Ray Serve"]
    found: list[str] = []
    h_ts, h_ray = handler_headers(ts.headers), handler_headers(ray.headers)
    for name in sorted(set(h_ts) | set(h_ray)):
        if h_ts.get(name) != h_ray.get(name):
            found.append(f"header {name}: {h_ts.get(name)!r} on TorchServe, {h_ray.get(name)!r} on Ray Serve")
    return found + body_differences(ts.body, ray.body, atol)


def send_rounds(url: str, auth: dict[str, str], requests: list[MigrateRequest]) -> dict[str, list[Answer]]:
    """{mode: one Answer per request}: one client in order, then every request at once."""
    from torchship.verify.load import LoadRequest, run_load

    pool = [LoadRequest(r.model, r.body, r.headers, check=lambda _reply: "") for r in requests]
    answers: dict[str, list[Answer]] = {}
    for mode, clients in zip(MODES, (1, min(MAX_CLIENTS, len(pool))), strict=True):
        shots = run_load(
            url, pool, clients=clients, auth=auth, requests_total=len(pool), pick=lambda _n, _i, g: g, keep_replies=True
        )
        got: list[Answer] = [Answer(0, {}, b"", "not sent")] * len(pool)
        for shot in shots:
            reply = shot.reply
            if reply is None:
                got[shot.request] = Answer(0, {}, b"", f"no answer ({shot.outcome}: {shot.detail})")
            else:
                got[shot.request] = Answer(reply.status, dict(reply.headers), reply.body)
        answers[mode] = got
    return answers


def serve_and_send(
    engine: str, model_store: Path, workdir: Path, requests: list[MigrateRequest], progress: Callable[[str], None]
) -> tuple[dict[str, list[Answer]], dict[str, str]]:
    """Serve the store on one engine, send both rounds, stop it: the answers and the endpoints it refused."""
    from torchship.engines import engine_class

    server = engine_class(engine)(model_store, workdir / engine)
    progress(f"{engine}: starting (log: {server.log_path})")
    try:
        server.start()
    except EngineError as exc:  # nothing serves: every request's answer is that
        progress(f"{engine}: did not start: {str(exc).splitlines()[0]}")
        failed = Answer(0, {}, b"", f"{engine} did not start: {str(exc).splitlines()[0]}")
        refused = dict(server.refused) or {m: str(exc).splitlines()[0] for m in server.endpoints}
        return {mode: [failed] * len(requests) for mode in MODES}, refused
    try:
        for endpoint, line in sorted(server.refused.items()):
            progress(f"{engine}: refused {endpoint}: {line}")
        progress(f"{engine}: ready; sending {len(requests)} requests one at a time, then all at once")
        answers = send_rounds(server.url, server.auth_headers(), requests)
    finally:
        server.stop()
    progress(f"{engine}: done")
    return answers, dict(server.refused)


def migrate(
    model_store: Path,
    requests_dir: Path | None,
    *,
    ray_model_store: Path | None = None,
    atol: float = 1e-5,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> MigrateResult:
    """Serve `model_store` on TorchServe and `ray_model_store` (default: the same) on Ray Serve, and compare."""
    archives = store_archives(model_store)
    stores = {"torchserve": model_store, "ray": ray_model_store or model_store}
    if ray_model_store is not None:
        names = {m.path.stem for m in archives}
        if (other := {m.path.stem for m in store_archives(ray_model_store)}) != names:
            raise TorchshipError(
                f"{ray_model_store} must hold the same models as {model_store}: {sorted(other ^ names)} are in one only"
            )
    if requests_dir is not None:
        requests, unsent = read_requests(requests_dir), []
        known = {m.path.stem for m in archives}
        if unknown := sorted({r.model for r in requests} - known):
            raise TorchshipError(f"requests name models {unknown} that {model_store} has no archive for")
        unsent = sorted(known - {r.model for r in requests})
    else:
        requests, unsent = reference_requests(archives)
        if not requests:
            raise TorchshipError(
                f"{model_store} holds only archives torchship did not build: pass --requests (one folder per model, "
                "one file per request body) so there is something to send"
            )
    work = workdir or Path(tempfile.mkdtemp(prefix="torchship-migrate-"))
    answers: dict[str, dict[str, list[Answer]]] = {}
    refused: dict[str, dict[str, str]] = {}
    for engine in ENGINES:  # one at a time: two engines at once would measure each other, not the archives
        answers[engine], refused[engine] = serve_and_send(engine, stores[engine], work, requests, progress)
    rows: list[MigrateRow] = []
    for mode in MODES:
        for i, req in enumerate(requests):
            got = {engine: answers[engine][mode][i] for engine in ENGINES}
            row = MigrateRow(req.model, req.name, mode, got)
            row.differences = [f"{e} refused to load it: {refused[e][req.model]}" for e in ENGINES if req.model in refused[e]]
            if not row.differences:
                row.differences = compare_answers(got["torchserve"], got["ray"], atol)
            rows.append(row)
    return MigrateResult(rows, refused, unsent)


def _answer_json(a: Answer) -> dict[str, Any]:
    return {"status": a.status, "handler_headers": handler_headers(a.headers), "body_bytes": len(a.body), "failure": a.failure}


def write_report(result: MigrateResult, report_dir: Path, *, model_store: Path, atol: float) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "model_store": str(model_store),
        "atol": atol,
        "passed": result.passed,
        "requests": len(result.rows),
        "differences": result.differences,
        "refused": result.refused,
        "unsent": result.unsent,
        "rows": [
            {"model": r.model, "request": r.request, "mode": r.mode, "same": not r.differences,
             "differences": r.differences, **{e: _answer_json(a) for e, a in r.answers.items()}}
            for r in result.rows
        ],
    }  # fmt: skip
    json_path = report_dir / "migrate.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# torchship migrate: {model_store}",
        "",
        f"{len(result.rows) - result.differences}/{len(result.rows)} answers the same on TorchServe and Ray Serve "
        f"(status, handler-set headers, body; JSON numbers within {atol:g}).",
        "",
    ]
    for engine, refused in result.refused.items():
        lines += [f"- refused on {engine}: {line}" for _endpoint, line in sorted(refused.items())]
    if result.unsent:
        lines += [f"- nothing sent to {', '.join(result.unsent)}: no requests for them (foreign archives need --requests)"]
    lines += ["", "| model | request | mode | TorchServe | Ray Serve | result |", "|---|---|---|---|---|---|"]
    for r in result.rows:
        ts, ray = r.answers["torchserve"], r.answers["ray"]
        verdict = "same" if not r.differences else "; ".join(d.replace("|", "\\|") for d in r.differences)
        lines.append(f"| {r.model} | {r.request} | {r.mode} | {ts.status or '-'} | {ray.status or '-'} | {verdict} |")
    md_path = report_dir / "migrate.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path
