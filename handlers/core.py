"""The engine-neutral endpoint: plain requests in, plain replies out (decode -> validate -> group -> predict -> encode).

torch + stdlib only: it travels inside every .mar. TorchServe's handler (handlers/service.py) and the Ray app
(torchship/engines/ray/app.py) are thin adapters over `EndpointCore`; neither engine's types appear here. Loading reads the
unpacked archive's manifest.json and endpoint.json and checks every file's sha256 before anything is deserialized.
A batch gets one reply per request, and a bad request fails only itself, never its batch neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codec import (
    InferRequest,
    Signature,
    check_body_size,
    check_content_type,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    model_metadata,
)
from .errors import ArtifactError, BadRequest, ClientError, NotFound, TokenRefused
from .metrics import (
    BATCH_REQUESTS,
    LOAD_REFUSALS,
    PARITY_CHECKED,
    PARITY_CHECKS,
    PARITY_OK,
    PARITY_WORST_ABS,
    REQUESTS,
    STAGE_SECONDS,
    Metrics,
)
from .names import (
    AUTHORIZATION_HEADER,
    BATCH_REQUESTS_HEADER,
    BATCH_ROWS_HEADER,
    BINARY_HEADER,
    CHECKSUMS_FILE,
    ENDPOINT_FILE,
    EXPLAIN_HEADER,
    MANIFEST_FILE,
    MAX_REQUEST_BYTES_ENV,
    PARITY_LOST_HEADER,
    PARITY_LOST_MARKER,
    REFERENCE_FILE,
    TEST_DRIFT_CLAIM_ENV,
    TEST_DRIFT_ENV,
    TIMING_HEADER,
    TOPK_FILE,
    VERSION_HEADER,
)
from .parity import Comparison, Tolerance, compare_all
from .tracing import Tracing
from .wire import (
    BINARY_TYPE,
    EMPTY_BODY,
    JSON_TYPE,
    Reply,
    Request,
    inference_token,
    probe_interval_s,
    server_timing,
    token_matches,
)

log = logging.getLogger(__name__)


#: A TorchScript endpoint's load-time optimisation, recorded in the manifest (formats.torchscript.options.optimize)
#: only where export measured it faster than the frozen file alone and it passed the parity gate.
OPTIMIZE_FOR_INFERENCE = "optimize_for_inference"


def load_torchscript(path: str, device: torch.device, options: Mapping[str, str] | None = None) -> Callable[..., Any]:
    """The frozen file; with options["optimize"] == optimize_for_inference, also `torch.jit.optimize_for_inference`
    (MKLDNN convolutions, conv/bn/relu fusion). That choice was measured and parity-checked on the CPU, so on any
    other device the frozen file runs as it is."""
    module = torch.jit.load(path, map_location=device).eval()
    if (options or {}).get("optimize") == OPTIMIZE_FOR_INFERENCE and device.type == "cpu":
        module = torch.jit.optimize_for_inference(module)
    loaded: Callable[..., Any] = module
    return loaded


def load_pt2(path: str, device: torch.device, options: Mapping[str, str] | None = None) -> Callable[..., Any]:
    module = torch.export.load(path).module()
    return module.to(device) if device.type != "cpu" else module


def load_aoti(path: str, device: torch.device, options: Mapping[str, str] | None = None) -> Callable[..., Any]:
    import torch._inductor  # heavy; only AOTInductor endpoints need it

    runner: Callable[..., Any] = torch._inductor.aoti_load_package(path)
    return runner


#: How each artifact format is loaded, by the `format` in endpoint.json. The export parity gate loads through
#: this same table, so what was checked at export is loaded exactly as the engines load it.
LOADERS: Mapping[str, Callable[[str, torch.device, Mapping[str, str] | None], Callable[..., Any]]] = {
    "torchscript": load_torchscript,
    "pt2": load_pt2,
    "aoti": load_aoti,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(model_dir: Path) -> None:
    """Refuse an unpacked archive any of whose files differs from what `torchship archive` wrote."""
    listing = model_dir / CHECKSUMS_FILE
    label = _endpoint_label(model_dir)
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{label}: {CHECKSUMS_FILE} is missing or unreadable ({exc}); rebuild the archive") from None
    if not isinstance(expected, dict) or not expected:
        raise ArtifactError(f"{label}: {CHECKSUMS_FILE} lists no files; rebuild the archive")
    changed = sorted(
        name for name, digest in expected.items() if not (model_dir / name).is_file() or sha256_file(model_dir / name) != digest
    )
    if changed:
        raise ArtifactError(
            f"{label}: {', '.join(changed)} missing or changed since the archive was built "
            "(sha256 mismatch); rebuild the archive with `torchship archive`"
        )


def _endpoint_label(model_dir: Path) -> str:
    """The endpoint's name for messages (the folder an engine unpacked into is a temp or digest name)."""
    try:
        return str(json.loads((model_dir / ENDPOINT_FILE).read_text(encoding="utf-8"))["endpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.name


def max_request_bytes(environ: Mapping[str, str]) -> int | None:
    raw = environ.get(MAX_REQUEST_BYTES_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{MAX_REQUEST_BYTES_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def torch_threads(setting: Any) -> int:
    """The intra-op threads an endpoint's model runs with: the model config's `torchThreads`, or (0 or absent) every
    core this process may run on. Set explicitly on both engines: Ray otherwise pins a replica that asked for a
    fraction of a CPU to one thread (OMP_NUM_THREADS=1), TorchServe's workers take every core."""
    try:
        threads = int(setting or 0)
    except (TypeError, ValueError):
        raise ValueError(f"torchThreads must be a whole number (0 = every core), got {setting!r}") from None
    if threads < 0:
        raise ValueError(f"torchThreads must be 0 or more, got {threads}")
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(gpu_id: Any) -> torch.device:
    """The GPU the engine assigned this worker, or the CPU when it assigned none (or none is usable)."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


@dataclass(frozen=True)
class Answered:
    """One batch's replies and where its time went: per request the stages' milliseconds and (start, end) marks, the
    whole call's milliseconds and its (start, end)."""

    replies: list[Reply]
    timings: list[dict[str, float]]
    marks: list[dict[str, tuple[float, float]]]
    handler_ms: float
    span: tuple[float, float]


@dataclass(frozen=True)
class ParityCheck:
    """One run of an archive's reference cases in this process: the worst comparison, when and how long."""

    comparison: Comparison
    cases: int
    checked_at: float
    duration_ms: float


def test_drift(environ: Mapping[str, str], endpoint: str) -> tuple[float, float] | None:
    """TEST_DRIFT_ENV's (delta, after_s) for `endpoint` in this process (a test hook), or None. With
    TEST_DRIFT_CLAIM_ENV set, only the process that creates that file first drifts."""
    for part in environ.get(TEST_DRIFT_ENV, "").split(","):
        name, sep, setting = part.strip().partition("=")
        if sep and name == endpoint:
            delta, _, after = setting.partition("@")
            claim = environ.get(TEST_DRIFT_CLAIM_ENV)
            if claim:
                try:
                    Path(claim).open("x").close()
                except FileExistsError:
                    return None
            return float(delta), float(after or 0)
    return None


class Drifted:
    """The model with `delta` added to each of its floating-point outputs once the drift is on (TEST_DRIFT_ENV only).
    With after_s 0 it is on from the load; otherwise the first parity probe after after_s turns it on, so the change
    lands between batches, where the probe runs: a test then sees what the probe promises, and no race between the
    drift's clock and a batch in flight."""

    def __init__(self, model: Callable[..., Any], delta: float, after_s: float) -> None:
        self.model, self.delta = model, delta
        self.start = time.monotonic() + after_s
        self.on = after_s <= 0
        log.warning("%s is set: this process answers %+g off its model after %g s (a test hook)", TEST_DRIFT_ENV, delta, after_s)

    def switch(self, now: float) -> None:
        self.on = self.on or now >= self.start

    def __call__(self, *args: Any) -> Any:
        raw = self.model(*args)
        if not self.on:
            return raw
        values = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw)
        shifted = tuple(v + self.delta if v.is_floating_point() else v for v in values)
        return shifted[0] if isinstance(raw, torch.Tensor) else shifted


class EndpointCore:
    """One endpoint: one model in one format, plus the top-k post-processing for classifiers."""

    def __init__(
        self, model_dir: Path, *, device: torch.device, environ: Mapping[str, str], model_config: Mapping[str, Any] | None = None
    ) -> None:
        """Load the unpacked archive at model_dir; raises ArtifactError (message marked LOAD_REFUSED_MARKER) when
        anything in it was changed after it was built, its format failed its parity gate, or this process's answers
        to the archive's references differ from them. model_config is the archive's model-config.yaml as the engine
        read it (torchThreads, parityProbeIntervalS)."""
        self.label = _endpoint_label(model_dir)
        self.metrics = Metrics.from_environ(environ, self.label)
        self.tracing = Tracing.from_environ(environ)
        try:
            verify_checksums(model_dir)
            manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
            endpoint = json.loads((model_dir / ENDPOINT_FILE).read_text(encoding="utf-8"))
            self.endpoint: str = endpoint["endpoint"]
            self.format: str = endpoint["format"]
            entry = manifest["formats"].get(self.format)
            if entry is None or entry.get("status") != "ok":
                raise ArtifactError(f"{self.endpoint}: format {self.format!r} did not pass its parity gate at export")
            artifact = model_dir / entry["file"]
            if not artifact.is_file() or sha256_file(artifact) != entry["sha256"]:
                raise ArtifactError(
                    f"{self.endpoint}: {artifact.name} is missing or does not match its sha256; rebuild the archive"
                )
            tol = manifest["tolerance"][self.format]
            self.tolerance = Tolerance(atol=float(tol["atol"]), rtol=float(tol["rtol"]))
        except ArtifactError as exc:
            self._refused("archive", exc)
            raise
        self.device = device
        self.threads = torch_threads((model_config or {}).get("torchThreads"))
        torch.set_num_threads(self.threads)
        self.signature = Signature.from_manifest(manifest)
        self.model: Callable[..., Any] = LOADERS[self.format](str(artifact), device, entry.get("options"))
        drift = test_drift(environ, self.endpoint)
        if drift is not None:
            self.model = Drifted(self.model, *drift)
        self.topk: Callable[..., Any] | None = None
        topk_file = model_dir / TOPK_FILE
        if self.signature.task == "classifier" and topk_file.is_file():
            self.topk = load_torchscript(str(topk_file), torch.device("cpu"))
        # Set only where the engine cannot enforce a shared token itself (TorchServe in Kubernetes; see the README).
        self.token = inference_token(environ)
        self.max_request_bytes = max_request_bytes(environ)
        # Parity before ready: this process answers the archive's reference inputs on its own device, through the
        # path every request takes, before the engine hears that it loaded. It doubles as the warm-up.
        self.reference_file = model_dir / REFERENCE_FILE
        self.probe_interval_s = probe_interval_s(environ, model_config)
        self.parity = self.check_references(self.reference_file)
        #: Set once a probe found this process's answers off its references: it answers no request again.
        self.parity_lost: str | None = None
        self.next_probe = time.monotonic() + self.probe_interval_s
        #: A probe and a batch never overlap (Ray health-checks from another thread than the one running batches): the
        #: probe's verdict holds for every batch that starts after it.
        self._turn = threading.Lock()
        if not self.parity.comparison.passed:
            refusal = ArtifactError(
                f"{self.endpoint}: its answers on {device} differ from the archive's references: worst |diff| "
                f"{self.parity.comparison.max_abs:.6g} (atol={self.tolerance.atol:g}, rtol={self.tolerance.rtol:g}); "
                f"{self.parity.comparison.reason}"
            )
            self._refused("parity", refusal)
            raise refusal
        log.info(
            "torchship endpoint %s: %s on %s, %d torch threads (token check %s); parity at load: %d reference "
            "cases within tolerance, worst |diff| %.3g, %.0f ms",
            *(self.endpoint, self.format, device, self.threads, bool(self.token), self.parity.cases),
            *(self.parity.comparison.max_abs, self.parity.duration_ms),
        )
        if self.metrics is not None:
            self.metrics.start()

    # -- parity --------------------------------------------------------------------------------------------------

    def check_references(self, reference_file: Path) -> ParityCheck:
        """Send every reference case the archive carries through the path a request takes (decode, batch, predict,
        encode; JSON and the binary-data extension in turn) and compare the answers with the eager outputs, within
        the manifest's tolerance for this format (the comparison verify uses). Recorded in the metrics as a check,
        not counted as requests."""
        started = time.perf_counter()
        cases = torch.load(str(reference_file), map_location="cpu", weights_only=True)["cases"]
        in_names = [s.name for s in self.signature.inputs]
        out_names = [s.name for s in self.signature.outputs]
        results: list[Comparison] = []
        for i, case in enumerate(cases):
            inputs = {n: case["inputs"][n] for n in in_names}
            binary = i % 2 == 0  # both encodings, each way: the whole path is checked, and warm, before ready
            body, headers = encode_request(inputs, binary=binary, parameters={"binary_data_output": binary})
            reply = self._answer([Request.of(body, headers)], own=True).replies[0]
            expected = tuple(case["outputs"][n] for n in out_names)
            if reply.status != 200:
                results.append(Comparison(float("inf"), float("inf"), False, f"reference case answered {reply.status}"))
                continue
            length = next((v for k, v in reply.headers.items() if k.lower() == BINARY_HEADER), None)
            outputs = decode_response(reply.body, length)["outputs"]
            results.append(compare_all(tuple(outputs[n] for n in out_names), expected, self.tolerance))
        worst = Comparison(
            max_abs=max((c.max_abs for c in results), default=0.0),
            max_rel=max((c.max_rel for c in results), default=0.0),
            passed=bool(results) and all(c.passed for c in results),
            reason="; ".join(c.reason for c in results if c.reason) or ("" if results else "the archive has no references"),
        )
        check = ParityCheck(worst, len(results), time.time(), _ms_since(started))
        if self.metrics is not None:
            endpoint = self.endpoint
            self.metrics.set(PARITY_OK, 1.0 if worst.passed else 0.0, endpoint=endpoint)
            self.metrics.set(PARITY_WORST_ABS, worst.max_abs, endpoint=endpoint)
            self.metrics.set(PARITY_CHECKED, check.checked_at, endpoint=endpoint)
            self.metrics.count(PARITY_CHECKS, endpoint=endpoint, result="ok" if worst.passed else "failed")
        return check

    def probe(self, *, now: float | None = None) -> bool:
        """Parity while serving, between batches (a batch in flight finishes first): re-run the references once the
        probe interval has passed. False once this process's answers left their references (it stays so: the engine
        replaces it)."""
        with self._turn:
            return self._probe(time.monotonic() if now is None else now)

    def _probe(self, now: float) -> bool:
        if self.parity_lost is None and self.probe_interval_s and now >= self.next_probe:
            if isinstance(self.model, Drifted):
                self.model.switch(now)
            self.parity = self.check_references(self.reference_file)
            self.next_probe = time.monotonic() + self.probe_interval_s
            worst = self.parity.comparison
            if not worst.passed:
                self.parity_lost = (
                    f"{PARITY_LOST_MARKER} {self.endpoint}: its answers on {self.device} no longer match the archive's "
                    f"references: worst |diff| {worst.max_abs:.6g} (atol={self.tolerance.atol:g}, "
                    f"rtol={self.tolerance.rtol:g}); this replica answers no more requests"
                )
                log.error("%s", self.parity_lost)
                if self.metrics is not None:
                    self.metrics.flush()
        return self.parity_lost is None

    def _refused(self, reason: str, exc: ArtifactError) -> None:
        log.error("%s", exc)
        if self.metrics is not None:
            self.metrics.count(LOAD_REFUSALS, endpoint=self.label, reason=reason)
            self.metrics.flush()

    # -- one batch from the engine -------------------------------------------------------------

    def infer_batch(self, requests: Sequence[Request]) -> list[Reply]:
        """One reply per request, in order; a client's mistake fails only its own request."""
        with self._turn:
            if not self._probe(time.monotonic()):
                # Never a drifted answer: a 503 that says the request did not reach the model, so it may go elsewhere.
                self.count_shed(len(requests))
                if self.metrics is not None:
                    self.metrics.flush()  # counted before the engine ends this process (the writer may be late)
                return [self._parity_lost_reply() for _ in requests]
            answered = self._answer(requests)
        if self.metrics is not None:
            self._record(answered.replies, answered.timings, answered.handler_ms)
        if self.tracing is not None:
            headers = [r.headers for r in requests]
            statuses = [r.status for r in answered.replies]
            self.tracing.record_batch(self.endpoint, headers, statuses, answered.marks, answered.span)
        return answered.replies

    def _answer(self, requests: Sequence[Request], *, own: bool = False) -> Answered:
        started = time.perf_counter()
        replies: list[Reply | None] = [None] * len(requests)
        marks: list[dict[str, tuple[float, float]]] = [{} for _ in requests]  # (start, end) of each stage it went through
        decoded: dict[int, InferRequest] = {}
        for idx, request in enumerate(requests):
            t0 = time.perf_counter()
            try:
                decoded[idx] = self._decode(request, own=own)
            except ClientError as exc:
                replies[idx] = Reply.error(exc)
            marks[idx]["decode"] = (t0, time.perf_counter())
        rows_run: dict[int, int] = {}
        for group in self._groups(decoded):
            self._predict_group(group, decoded, replies, marks)
            rows_run.update(dict.fromkeys(group, sum(decoded[i].batch_size for i in group)))
        ended = time.perf_counter()
        handler_ms = (ended - started) * 1000.0
        timings = [{stage: (end - start) * 1000.0 for stage, (start, end) in m.items()} for m in marks]
        out: list[Reply] = []
        for idx, maybe in enumerate(replies):
            # Every request must have been answered; a gap is our bug, reported as a server fault.
            reply = maybe or Reply.error("internal error: request was not answered", 500)
            # Observability: how many requests the engine batched together, how many rows the model ran, and where
            # the handler's time went (model = the whole batch's forward pass; handler = the whole batch's call).
            reply.headers[BATCH_REQUESTS_HEADER] = str(len(requests))
            if idx in rows_run:
                reply.headers[BATCH_ROWS_HEADER] = str(rows_run[idx])
            reply.headers[TIMING_HEADER] = server_timing({**timings[idx], "handler": handler_ms})
            out.append(reply)
        if len(out) != len(requests):
            raise RuntimeError(f"handler produced {len(out)} replies for {len(requests)} requests")
        return Answered(out, timings, marks, handler_ms, (started, ended))

    def _record(self, replies: Sequence[Reply], timings: Sequence[Mapping[str, float]], handler_ms: float) -> None:
        metrics, endpoint = self.metrics, self.endpoint
        assert metrics is not None
        codes: dict[int, int] = {}
        for reply in replies:
            codes[reply.status] = codes.get(reply.status, 0) + 1
        for code, n in codes.items():
            metrics.count(REQUESTS, n, endpoint=endpoint, code=str(code))
        for stage in ("decode", "model", "encode"):
            metrics.observe(STAGE_SECONDS, [t[stage] / 1000.0 for t in timings if stage in t], endpoint=endpoint, stage=stage)
        metrics.observe(STAGE_SECONDS, [handler_ms / 1000.0] * len(replies), endpoint=endpoint, stage="handler")
        metrics.observe(BATCH_REQUESTS, [len(replies)], endpoint=endpoint)

    def _parity_lost_reply(self) -> Reply:
        reply = Reply.error(f"{self.endpoint} on this replica lost parity with its references; retry", 503)
        reply.headers.update({PARITY_LOST_HEADER: "1", "retry-after": "1"})
        return reply

    def count_shed(self, n: int) -> None:
        """Requests the engine's adapter answered 503 itself (draining): counted as answered and as shed."""
        if self.metrics is not None and n:
            self.metrics.shed(self.endpoint, n)

    def _decode(self, request: Request, *, own: bool = False) -> InferRequest:
        """own: the replica's own reference requests, which no access rule or body limit is for."""
        if not own and self.token and not token_matches(request.headers.get(AUTHORIZATION_HEADER), self.token):
            raise TokenRefused()
        if request.headers.get(EXPLAIN_HEADER, "").lower() == "true":
            raise NotFound(f"{self.endpoint} serves no explanations; POST /v2/models/{self.endpoint}/infer for its outputs")
        check_content_type(request.headers.get("content-type"))
        if request.body is None:
            raise BadRequest(EMPTY_BODY)
        if not own:
            check_body_size(request.body, self.max_request_bytes)
        return decode_request(request.body, self.signature, header_length=request.headers.get(BINARY_HEADER))

    def _groups(self, decoded: Mapping[int, InferRequest]) -> list[list[int]]:
        """Requests that can run as one batch: same non-batch shapes, total batch within the model's limit."""
        by_shape: dict[tuple[object, ...], list[int]] = {}
        for idx, req in decoded.items():
            by_shape.setdefault((req.shape_key(), self._model_kwargs(req)), []).append(idx)
        groups: list[list[int]] = []
        for members in by_shape.values():
            current: list[int] = []
            rows = 0
            for idx in members:
                b = decoded[idx].batch_size
                if current and rows + b > self.signature.max_batch_size:
                    groups.append(current)
                    current, rows = [], 0
                current.append(idx)
                rows += b
            groups.append(current)
        return groups

    def _predict_group(
        self,
        group: list[int],
        decoded: Mapping[int, InferRequest],
        replies: list[Reply | None],
        marks: list[dict[str, tuple[float, float]]],
    ) -> None:
        names = [s.name for s in self.signature.inputs]
        t0 = time.perf_counter()
        try:
            args: list[Any] = [torch.cat([decoded[i].inputs[n] for i in group]).to(self.device) for n in names]
            outputs = self.predict([*args, *self._model_kwargs(decoded[group[0]])])
        except Exception as exc:  # a model fault fails this group with 500, never its neighbours in other groups
            log.exception("prediction failed for %d request(s)", len(group))
            for i in group:
                replies[i] = Reply.error(f"prediction failed: {type(exc).__name__}", 500)
            return
        sizes = [decoded[i].batch_size for i in group]
        pieces = [torch.split(t, sizes) for t in outputs.values()]
        per_request = [dict(zip(outputs, parts, strict=True)) for parts in zip(*pieces, strict=True)]
        if len(per_request) != len(group):
            raise RuntimeError(f"split {len(per_request)} results for {len(group)} requests")
        model = (t0, time.perf_counter())
        for i, result in zip(group, per_request, strict=True):
            t1 = time.perf_counter()
            replies[i] = self._encode(decoded[i], result)
            marks[i].update(model=model, encode=(t1, time.perf_counter()))

    def _model_kwargs(self, request: InferRequest) -> tuple[int, ...]:
        """Extra positional arguments the model itself takes: top_k for the post-processing endpoint."""
        if self.signature.task == "postprocess":
            return (int(request.parameters.get("top_k", self.signature.outputs[0].shape[-1])),)
        return ()

    def predict(self, args: list[Any]) -> dict[str, torch.Tensor]:
        """Run the model once on a stacked batch; outputs named as the manifest declares."""
        with torch.inference_mode():
            raw = self.model(*args)
        values = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw)
        names = [s.name for s in self.signature.outputs]
        if len(values) != len(names):
            raise RuntimeError(f"model returned {len(values)} outputs, manifest declares {len(names)}")
        return {n: v.to("cpu") for n, v in zip(names, values, strict=True)}

    def _encode(self, request: InferRequest, result: dict[str, torch.Tensor]) -> Reply:
        try:
            result = self._postprocess(request, result)
            if request.requested_outputs:
                unknown = sorted(set(request.requested_outputs) - set(result))
                if unknown:
                    raise BadRequest(f"unknown outputs {unknown}; this endpoint returns {sorted(result)}")
                result = {n: result[n] for n in request.requested_outputs}
            body, headers = encode_response(
                result,
                model_name=self.endpoint,
                model_version=self.signature.version,
                request_id=request.id,
                binary_outputs=request.binary_outputs,
            )
        except ClientError as exc:
            return Reply.error(exc)
        content_type = BINARY_TYPE if headers else JSON_TYPE
        return Reply(200, body, {"content-type": content_type, VERSION_HEADER: self.signature.version, **headers})

    def _postprocess(self, request: InferRequest, result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = request.parameters.get("top_k")
        if k is None or self.topk is None:
            return result
        logits = result[self.signature.outputs[0].name]
        with torch.inference_mode():
            probabilities, classes = self.topk(logits, int(k))
        return {**result, "probabilities": probabilities, "classes": classes}

    def metadata(self) -> dict[str, Any]:
        """OIP v2 model metadata (`GET /v2/models/<endpoint>`), from the archive's manifest."""
        return model_metadata(self.endpoint, self.format, self.signature)
