"""The Ray Serve application: the very .mar files of the model store, served through the same handler core.

Each archive is unpacked into a cache (sha256-named, no entry outside it), loaded by `torchship.handlers.core.EndpointCore`
(the same core TorchServe's handler wraps), and batched with `@serve.batch` sized from the archive's
model-config.yaml. An ingress deployment answers TorchServe's `POST /predictions/<endpoint>` and the rest of OIP v2
REST. A replica imports only the handler package, the archive reader, Ray and Starlette.

An archive torchship did not build (no endpoint.json) is served by its own TorchServe handler instead, run by
TorchServe's worker code (`ForeignDeployment`, torchserve_worker.py; docs/migrate.md). An archive that refuses to load
is left out by the builder (`exclude`), and the rest of the store is served.

`app(args)` is the application builder that `serve run` / `serve deploy` and KubeRay's `serveConfigV2` import.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from torchship import handlers
from torchship.archive.mar import MarArchive, store_archives
from torchship.handlers.errors import ArtifactError, HandlerMismatch, TokenRefused
from torchship.handlers.metrics import Metrics
from torchship.handlers.names import (
    AUTHORIZATION_HEADER,
    DRAINING_MESSAGE,
    EXPLAIN_HEADER,
    HANDLER_PACKAGE,
    HANDLER_PACKAGE_FILES,
    MAX_REQUEST_BYTES_ENV,
    NODE_HEADER,
    PARITY_LOST_HEADER,
    TIMING_HEADER,
    VERIFY_KEY_ENV,
)
from torchship.handlers.tracing import Tracing
from torchship.handlers.wire import Reply, encode_error, inference_token, probe_interval_s, server_timing, token_matches
from torchship.handlers.wire import Request as CoreRequest

#: How long a readiness probe waits for an endpoint's replica to answer.
READY_PROBE_TIMEOUT_S = 2.0
#: How often a stopping replica checks whether its in-flight requests are done (Ray's default, 2 s, made every
#: stop of an idle app take ~5 s of serve.shutdown; measured 1.1 s with this).
DRAIN_POLL_S = 0.2
#: An endpoint's max_ongoing_requests, in batches: room for a full batch plus the next one forming.
ONGOING_BATCHES = 2
#: What the app's `deployments` argument may set per endpoint.
DEPLOYMENT_OVERRIDES = ("num_replicas", "max_ongoing_requests", "max_queued_requests")
#: How long the ingress keeps sending a request again that a replica without parity turned away, how long it waits
#: between tries, and how often Ray health-checks (and so probes) replicas while the parity probe is on.
PARITY_RETRY_S = 10.0
PARITY_RETRY_WAIT_S = 0.05
PROBE_HEALTH_CHECK_S = 2.0
#: Seconds a client is told to wait after a 503 for a full queue.
RETRY_AFTER_S = 1
#: A request body must arrive within this (408 and the connection closed otherwise); TORCHSHIP_BODY_TIMEOUT_S sets it.
BODY_TIMEOUT_S = 30.0
BODY_TIMEOUT_ENV = "TORCHSHIP_BODY_TIMEOUT_S"
#: Where unpacked archives are cached (one folder per archive sha256).
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "torchship-ray-cache"

#: The OIP v2 protocol extensions the app serves (Triton's binary tensor data on REST; gRPC's raw contents are the
#: protocol's own), for the server metadata.
EXTENSIONS = ("binary_tensor_data",)


def check_same_handler(model_dir: Path) -> None:
    """Refuse an archive whose handler package differs from the code this app runs, byte for byte.

    TorchServe runs the handler the archive carries; this app runs the installed one. Both are the same files only
    if the archive was built by this torchship: otherwise pre/post-processing could drift between the engines.
    """
    installed = Path(handlers.__file__).resolve().parent
    for name in HANDLER_PACKAGE_FILES:
        archived = model_dir / HANDLER_PACKAGE / name
        if not archived.is_file() or archived.read_bytes() != (installed / name).read_bytes():
            raise HandlerMismatch(
                f"{model_dir.name}: {HANDLER_PACKAGE}/{name} in the archive differs from the one this app runs; "
                "rebuild the archives with this torchship (`torchship archive`)"
            )


def unpack_checked(mar: str, cache_dir: str, verify_key_file: str | None, archive_sha256: str | None) -> tuple[MarArchive, Path]:
    """A replica's archive, its signature checked when a verify key is set, unpacked into the cache."""
    if verify_key_file:
        # Again here, not only in the builder: the replica reads the file itself, maybe long after the build.
        from torchship.archive.signing import load_verify_key, verify_archive
        from torchship.errors import ArchiveError

        try:
            verify_archive(Path(mar), load_verify_key(Path(verify_key_file)))
        except ArchiveError as exc:
            raise ArtifactError(str(exc)) from None
    archive = MarArchive(Path(mar))
    model_dir = archive.unpack_cached(Path(cache_dir))
    # The builder's digest of the archive (the cache folder is named by the file's own): a file replaced since (a
    # rollout in progress, a hand edit) is refused here, before its model loads, rather than served under the old
    # deployment's name. The digest is also what makes Ray redeploy a replaced file.
    if archive_sha256 and model_dir.name != archive_sha256:
        raise ArtifactError(f"{Path(mar).name} changed after the app was built; redeploy the app to serve it")
    return archive, model_dir


def _gpu_id() -> int | None:
    # Ray sets CUDA_VISIBLE_DEVICES for a replica that asked for a GPU; without one the model stays on the CPU.
    return 0 if os.environ.get("CUDA_VISIBLE_DEVICES") else None


class ArchiveDeployment:
    """One endpoint (one .mar) as a Ray Serve deployment: the archive checked and unpacked, batching set from its
    model config; a subclass loads what serves it (`_load`) and defines `infer_batch`."""

    infer_batch: Any  # a subclass's @serve.batch method

    def __init__(
        self,
        mar: str,
        cache_dir: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        *,
        verify_key_file: str | None = None,
        archive_sha256: str | None = None,
    ) -> None:
        archive, self.model_dir = unpack_checked(mar, cache_dir, verify_key_file, archive_sha256)
        self._load(archive, Path(mar).stem, max_batch_size)
        self.infer_batch.set_max_batch_size(max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _load(self, archive: MarArchive, name: str, max_batch_size: int) -> None:
        raise NotImplementedError


class EndpointDeployment(ArchiveDeployment):
    """A torchship archive: Ray's adapter over `EndpointCore`."""

    def _load(self, archive: MarArchive, name: str, max_batch_size: int) -> None:
        # Here, not at the module's top: the ingress and the app's builder import this module too, and run no model
        # (torch would cost each about 180 MiB and a second of start-up).
        from torchship.handlers.core import EndpointCore, pick_device

        check_same_handler(self.model_dir)
        self.core = EndpointCore(
            self.model_dir, device=pick_device(_gpu_id()), environ=os.environ, model_config=archive.model_config
        )
        # Which Ray node answered: lets a multi-node deployment show that replicas on every node serve.
        self.node_id = ray.get_runtime_context().get_node_id()

    def check_health(self) -> None:
        """Ray's periodic health check doubles as the idle replica's parity probe: a replica whose answers left its
        references fails it, and Ray stops routing to it and starts a fresh one (which checks again before ready)."""
        if not self.core.probe():
            raise RuntimeError(self.core.parity_lost)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer_batch(self, requests: list[CoreRequest]) -> list[Reply]:
        replies = self.core.infer_batch(requests)
        if len(replies) != len(requests):
            raise RuntimeError(f"handler answered {len(replies)} of {len(requests)} requests")
        for reply in replies:
            reply.headers[NODE_HEADER] = self.node_id
        return replies

    async def infer(self, body: bytes, headers: dict[str, str]) -> Reply:
        reply: Reply = await self.infer_batch(CoreRequest.of(body, headers))
        return reply

    def metadata(self) -> dict[str, Any]:
        return self.core.metadata()


class ForeignDeployment(ArchiveDeployment):
    """An archive torchship did not build: its own handler run by TorchServe's worker code (torchserve_worker.py),
    batched as its model config says."""

    def _load(self, archive: MarArchive, name: str, max_batch_size: int) -> None:
        from torchship.archive.foreign import handler_spec, oip_metadata
        from torchship.engines.ray.torchserve_worker import TorchServeWorker

        self._metadata = oip_metadata(name, archive.version)
        try:
            self.worker = TorchServeWorker(
                self.model_dir, name, handler_spec(archive), gpu_id=_gpu_id(), batch_size=max_batch_size
            )
        except Exception as exc:  # the archive's own code: whatever it raised is the refusal's cause
            cause = f"the handler failed to load: {type(exc).__name__}: {exc}".splitlines()[0]
            raise ArtifactError(f"{name}: {cause}") from None

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.1)
    async def infer_batch(self, requests: list[Any]) -> list[Any]:
        return self.worker.predict(requests)

    async def infer(self, request: Any) -> Any:
        return await self.infer_batch(request)

    def metadata(self) -> dict[str, Any]:
        return self._metadata


def _json(status: int, doc: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(doc).encode("utf-8"), status_code=status, headers=dict(headers or {}), media_type="application/json"
    )


def _queue_full(name: str) -> Response:
    """The endpoint's queue is full (jobQueueSize): refuse now, as TorchServe does, rather than queue forever."""
    return Response(
        encode_error(f"endpoint {name!r} is at its queue limit; retry later"),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
        media_type="application/json",
    )


def _error(status: int, message: str) -> Response:
    return Response(encode_error(message), status_code=status, media_type="application/json")


class Ingress:
    """Routes TorchServe's and OIP v2's REST paths to the endpoint deployments; enforces the inference token."""

    def __init__(
        self,
        endpoints: dict[str, DeploymentHandle],
        versions: dict[str, str],
        token: str | None,
        max_request_bytes: int,
        server_version: str,
        *,
        foreign: frozenset[str] = frozenset(),
    ) -> None:
        self.endpoints = endpoints
        self.versions = versions
        #: Endpoints whose archive torchship did not build: their own handler answers (ForeignDeployment).
        self.foreign = foreign
        #: OIP v2 server metadata (`GET /v2`, gRPC ServerMetadata).
        self.server_metadata: dict[str, Any] = {"name": "torchship", "version": server_version, "extensions": list(EXTENSIONS)}
        self.token = token
        self.max_request_bytes = max_request_bytes
        self._grpc_frontend: Any = None  # deploy.ray_grpc.GrpcFrontend, built at the first gRPC call
        #: "" serving, "not_ready" (a drain's window: still answering, ready says 503), "refusing" (new requests get
        #: a JSON 503 while accepted ones finish); set by engines.ray.drain_app on SIGTERM.
        self.draining = ""
        self.accepted = 0
        self.body_timeout_s = float(os.environ.get(BODY_TIMEOUT_ENV) or BODY_TIMEOUT_S)
        self.tracing = Tracing.from_environ(os.environ)
        #: The shed requests (a full queue, a drain) the replicas never see, counted as TorchServe's handler counts its own.
        self.metrics = Metrics.from_environ(os.environ, "ingress")
        if self.metrics is not None:
            self.metrics.start()

    def count_shed(self, name: str) -> None:
        if self.metrics is not None and name in self.endpoints:
            self.metrics.shed(name)

    def drain(self, stage: str) -> None:
        self.draining = stage

    def in_flight(self) -> int:
        """Inference requests this ingress accepted and has not answered yet."""
        return self.accepted

    def _authorized(self, request: Request) -> bool:
        return not self.token or token_matches(request.headers.get(AUTHORIZATION_HEADER), self.token)

    async def __call__(self, request: Request) -> Response:
        # Empty segments are kept ("//predictions//x" is no route), trailing ones dropped ("/v2/models/m//" is
        # "/v2/models/m"): TorchServe's routing splits paths with Java's String.split, which does exactly that.
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root + "/"):  # an app under a route prefix (a rollout's candidate) routes below it
            path = path[len(root) :]
        parts = path.split("/")[1:]
        while len(parts) > 1 and parts[-1] == "":
            parts = parts[:-1]
        method = request.method
        if parts in (["ping"], ["v2", "health", "live"], ["v2", "health", "ready"]):
            # TorchServe answers these whatever the method, and its ready body has no "live" (nor has KServe's).
            if parts == ["v2", "health", "ready"]:
                ready = not self.draining and all([await self._ready(name) for name in sorted(self.endpoints)])
                return _json(200 if ready else 503, {"ready": ready})
            return _json(200, {"status": "Healthy"} if parts == ["ping"] else {"live": True})
        if parts == ["v2"]:
            return _json(200, self.server_metadata) if method == "GET" else _error(405, "use GET")
        if len(parts) in (2, 3) and parts[0] == "predictions" and all(parts):
            # TorchServe hands /predictions/<model>[/<version>] to the handler whatever the method (a GET has no body
            # and gets 400); this app does the same, so both engines answer every request alike.
            return await self._infer(request, parts[1], version=parts[2] if len(parts) == 3 else None)
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] in ("infer", "explain"):
            # OIP's infer and explain as TorchServe routes them: any method, the name cut at its first ":" (KServe
            # v1's `<m>:predict` heritage), and the explain header set (the handler refuses explain requests).
            return await self._infer(request, parts[2].split(":")[0], explain=parts[3] == "explain")
        if len(parts) == 3 and parts[:2] == ["v2", "models"]:
            return await self._metadata(request, parts[2])
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "ready":
            if method != "GET":
                return _error(405, "use GET")
            if parts[2] not in self.endpoints:
                return _error(404, f"Model not found: {parts[2]}")
            ready = await self._ready(parts[2])
            return _json(200 if ready else 503, {"name": parts[2], "ready": ready})
        if len(parts) > 4 and "/versions" in "/" + "/".join(parts):
            # TorchServe's OIP handler answers any longer path that names versions with this 501 (its very body).
            return _error(501, "Model versioning is not yet supported.")
        return _error(404, f"no route for {request.url.path}")

    async def _ready(self, name: str) -> bool:
        """Ready means a replica of the endpoint answers now: the ingress alone being up says nothing about a
        deployment whose replicas are still loading, or refusing to load, their archive."""
        try:
            await asyncio.wait_for(self.endpoints[name].metadata.remote(), timeout=READY_PROBE_TIMEOUT_S)
        except Exception:  # no replica yet, or it failed: not ready, whatever the reason
            return False
        return True

    async def _metadata(self, request: Request, name: str) -> Response:
        if request.method != "GET":
            return _error(405, "use GET")
        if name not in self.endpoints:
            return _error(404, f"Model not found: {name}")
        return _json(200, await self.endpoints[name].metadata.remote())

    async def _infer(self, request: Request, name: str, *, version: str | None = None, explain: bool | None = None) -> Response:
        if self.draining == "refusing":
            self.count_shed(name)
            return Response(
                encode_error(DRAINING_MESSAGE),
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
                media_type="application/json",
            )
        self.accepted += 1
        try:
            return await self._accepted(request, name, version, explain)
        finally:
            self.accepted -= 1

    async def _accepted(self, request: Request, name: str, version: str | None, explain: bool | None) -> Response:
        started = time.perf_counter()
        if not self._authorized(request):
            # The same status and wording TorchServe uses, so both engines have one access rule.
            return _error(TokenRefused.status, str(TokenRefused()))
        if name not in self.endpoints:
            return _error(404, f"Model not found: {name}")
        if version is not None and version != self.versions.get(name):
            return _error(404, f"Model version: {version} does not exist for model: {name}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return _error(413, f"body is {declared} bytes; the limit is {self.max_request_bytes}")
        try:
            body = await asyncio.wait_for(request.body(), timeout=self.body_timeout_s)
        except TimeoutError:
            # A body trickling in (slowloris) is cut: Ray's proxy and uvicorn have no body timeout of their own.
            message = f"request body not received within {self.body_timeout_s:g} s"
            return Response(
                encode_error(message), status_code=408, headers={"Connection": "close"}, media_type="application/json"
            )
        if len(body) > self.max_request_bytes:
            return _error(413, f"body is {len(body)} bytes; the limit is {self.max_request_bytes}")
        headers = {k.lower(): v for k, v in request.headers.items()}
        if explain is not None:
            headers[EXPLAIN_HEADER] = str(explain)  # "True" / "False", as TorchServe sets it on its OIP routes
        if name in self.foreign:
            return await self._foreign(request, name, body, headers)
        try:
            reply = await self.call_endpoint(name, body, headers)
        except BackPressureError:
            self.count_shed(name)
            return _queue_full(name)
        # The ingress's own total joins the handler's phases: the gap is Ray's routing and the batch wait.
        timing = server_timing({"ingress": (time.perf_counter() - started) * 1000.0})
        handler_timing = reply.headers.get(TIMING_HEADER)
        reply.headers[TIMING_HEADER] = f"{handler_timing}, {timing}" if handler_timing else timing
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    async def call_endpoint(self, name: str, body: bytes, headers: dict[str, str]) -> Reply:
        """The endpoint's reply (REST and gRPC alike), under the ingress's trace span when tracing is on. A replica that
        lost parity answered without running the model, so the request goes again (to another replica, once Ray's
        health check has taken that one out) until PARITY_RETRY_S has passed."""
        span = self.tracing.start_server_span(f"torchship.ingress {name}", headers) if self.tracing else None
        status = 500
        try:
            deadline = time.monotonic() + PARITY_RETRY_S
            while True:
                reply: Reply = await self.endpoints[name].infer.remote(body, headers)
                status = reply.status
                if PARITY_LOST_HEADER not in reply.headers or time.monotonic() >= deadline:
                    return reply
                await asyncio.sleep(PARITY_RETRY_WAIT_S)
        except BackPressureError:
            status = 503
            raise
        finally:
            if span is not None and self.tracing is not None:
                self.tracing.end_server_span(span, status)

    async def _foreign(self, request: Request, name: str, body: bytes, headers: dict[str, str]) -> Response:
        """A foreign archive's request, handed over as TorchServe's frontend hands it to a worker."""
        import uuid

        from torchship.engines.ray.torchserve_worker import TsRequest, request_parameters

        parameters = request_parameters(body, headers.get("content-type"), request.url.query)
        ts_request = TsRequest(str(uuid.uuid4()), sorted(headers.items()), parameters)
        try:
            reply = await self.endpoints[name].infer.remote(ts_request)
        except BackPressureError:
            self.count_shed(name)
            return _queue_full(name)
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    # -- OIP v2 gRPC: Ray's gRPC proxy calls the method named after the RPC with the message's bytes -----------------

    async def _grpc(self, rpc: str, request: bytes, grpc_context: Any) -> Any:
        if self._grpc_frontend is None:
            from torchship.engines.ray.grpc_servicer import GrpcFrontend  # tritonclient's protobufs: imported once gRPC is used

            self._grpc_frontend = GrpcFrontend(self)
        return await self._grpc_frontend.call(rpc, request, grpc_context)

    async def ServerLive(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802  (Ray routes an RPC by name)
        return await self._grpc("ServerLive", request, grpc_context)

    async def ServerReady(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802
        return await self._grpc("ServerReady", request, grpc_context)

    async def ServerMetadata(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802
        return await self._grpc("ServerMetadata", request, grpc_context)

    async def ModelReady(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802
        return await self._grpc("ModelReady", request, grpc_context)

    async def ModelMetadata(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802
        return await self._grpc("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: bytes, grpc_context: Any) -> Any:  # noqa: N802
        return await self._grpc("ModelInfer", request, grpc_context)


class NoEndpoints(ValueError):
    """Every archive of the store was refused: there is no app to deploy."""


def _token(args: Mapping[str, Any]) -> str | None:
    if args.get("token"):
        return str(args["token"])
    if args.get("token_file"):
        return Path(str(args["token_file"])).read_text(encoding="utf-8").strip()
    return inference_token(os.environ)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder. args: model_store (folder of .mar), cache_dir, token / token_file, num_cpus per
    replica (ingress_num_cpus for the ingress), num_gpus per endpoint replica (0: CPU), num_replicas,
    max_request_bytes, verify_key_file (else $TORCHSHIP_VERIFY_KEY_FILE: only archives signed by that key), `exclude`
    (endpoints left out: the child's list of refused ones), and `deployments`: {endpoint: {num_replicas,
    max_ongoing_requests, max_queued_requests}} for one endpoint (what a
    Serve config's `deployments:` list does for `serve deploy`). Batch size and wait come from each archive's
    model-config.yaml."""
    model_store = Path(args.get("model_store", "model_store")).resolve()
    cache_dir = str(Path(args.get("cache_dir", DEFAULT_CACHE)).resolve())
    archives = store_archives(model_store)
    num_cpus = float(args.get("num_cpus", 0.1))
    # Fractional GPUs let several endpoints share one device; Ray sets CUDA_VISIBLE_DEVICES for the replica.
    num_gpus = float(args.get("num_gpus", 0))
    actor_options: dict[str, float] = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}
    num_replicas = int(args.get("num_replicas", 1))
    # Signed archives only, when a verify key is configured: the whole store is refused before any deployment exists.
    verify_key_file = str(args.get("verify_key_file") or os.environ.get(VERIFY_KEY_ENV, "")).strip() or None
    if verify_key_file:
        from torchship.archive.signing import load_verify_key, verify_store

        verify_store(model_store, load_verify_key(Path(verify_key_file)))
    overrides: Mapping[str, Mapping[str, int]] = args.get("deployments") or {}
    unknown = [f"{name}.{key}" for name, o in overrides.items() for key in o if key not in DEPLOYMENT_OVERRIDES]
    if unknown:
        raise ValueError(f"deployments overrides {unknown} are not supported; use {sorted(DEPLOYMENT_OVERRIDES)}")
    handles: dict[str, serve.Application] = {}
    versions: dict[str, str] = {}
    foreign: set[str] = set()
    # Endpoints a deployment attempt refused (the launcher's child deploys the app again without them).
    excluded = set(args.get("exclude") or ())
    for mar in archives:
        if mar.path.stem in excluded:
            continue
        if not mar.is_torchship:
            from torchship.archive.foreign import preflight, refusal

            if cause := preflight(mar):
                print(refusal(mar.path.stem, cause), flush=True)
                continue
            foreign.add(mar.path.stem)
        config, versions[mar.path.stem] = mar.model_config, mar.version
        # A foreign archive without a model config gets TorchServe's defaults: no batching, 100 ms.
        default_batch, default_wait_ms = (8, 5) if mar.is_torchship else (1, 100)
        batch = int(config.get("batchSize", default_batch))
        wait_s = float(config.get("maxBatchDelay", default_wait_ms)) / 1000.0
        own = overrides.get(mar.path.stem, {})
        probe_on = mar.is_torchship and probe_interval_s(os.environ, config) > 0
        deployment_class = EndpointDeployment if mar.is_torchship else ForeignDeployment
        deployment = serve.deployment(deployment_class).options(
            name=mar.path.stem,
            # A foreign archive's minWorkers is its replicas, as TorchServe starts that many workers for it.
            num_replicas=int(
                own.get("num_replicas", num_replicas if mar.is_torchship else config.get("minWorkers", num_replicas))
            ),
            # Batches never exceed max_ongoing_requests.
            max_ongoing_requests=int(own.get("max_ongoing_requests", ONGOING_BATCHES * batch)),
            # The model config's jobQueueSize, TorchServe's per-model queue limit: past it the ingress answers 503.
            max_queued_requests=int(own.get("max_queued_requests", config.get("jobQueueSize", -1))),
            ray_actor_options=actor_options,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            # With the parity probe on, the health check (the probe when due) runs often enough that a replica that
            # lost parity leaves the routing table well within PARITY_RETRY_S.
            **({"health_check_period_s": PROBE_HEALTH_CHECK_S} if probe_on else {}),
        )
        digest = hashlib.sha256(mar.path.read_bytes()).hexdigest()
        handles[mar.path.stem] = deployment.bind(
            str(mar.path), cache_dir, batch, wait_s, verify_key_file=verify_key_file, archive_sha256=digest
        )
    if not handles:
        raise NoEndpoints(f"no endpoint of {model_store} can be served: every archive was refused (see the lines above)")
    ingress_cpus = float(args.get("ingress_num_cpus", num_cpus))
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": ingress_cpus},
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    )
    from torchship import __version__  # the builder runs where torchship is installed; replicas get the string

    return ingress.bind(handles, versions, _token(args), _body_limit(args), __version__, foreign=frozenset(foreign))


def _body_limit(args: Mapping[str, Any]) -> int:
    """max_request_bytes from the app's args, else TORCHSHIP_MAX_REQUEST_BYTES (the handler's own setting), else
    max_request_size from config.properties (the packaged one, or the TORCHSHIP_CONFIG_DIR copy), the one source."""
    raw = args.get("max_request_bytes") or os.environ.get(MAX_REQUEST_BYTES_ENV)
    if raw is None:
        from torchship.settings import default_body_limit_bytes

        return default_body_limit_bytes()
    if not str(raw).isdigit() or int(raw) <= 0:
        raise ValueError(f"max_request_bytes must be a positive integer, got {raw!r}")
    return int(raw)
