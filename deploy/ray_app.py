"""The Ray Serve application: the very .mar files of the model store, served through the same handler code.

Each archive is unpacked into a cache (sha256-named, no entry outside it), loaded by `handlers.service`
with a small context adapter, and batched with `@serve.batch` sized from the archive's model-config.yaml. An ingress
deployment answers TorchServe's `POST /predictions/<endpoint>` and the rest of OIP v2 REST.

`app(args)` is the application builder that `serve run` / `serve deploy` and KubeRay's `serveConfigV2` import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

import handlers
from deploy.archive import HANDLER_PACKAGE_FILES
from handlers.codec import TOKEN_FAILED, TOKEN_STATUS, TensorSignature, encode_error, inference_token, token_matches
from handlers.service import TorchshipHandler

#: Where unpacked archives are cached (one folder per archive sha256).
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "torchship-ray-cache"
#: Same limit as TorchServe's max_request_size in configs/config.properties.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
NODE_HEADER = "X-Torchship-Node"


class UnsafeArchive(Exception):
    """An archive entry would be written outside the cache folder."""


def unpack_mar(mar: Path, cache_dir: Path) -> Path:
    """Unpack a .mar into cache_dir/<sha256>/ once; refuse entries that would land outside that folder."""
    digest = hashlib.sha256(mar.read_bytes()).hexdigest()
    dest = cache_dir / digest
    if (dest / ".complete").is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{digest[:12]}-"))
    try:
        with zipfile.ZipFile(mar) as z:
            for info in z.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise UnsafeArchive(f"{mar.name}: entry {info.filename!r} would be written outside the cache")
                target = staging.joinpath(*name.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
        (staging / ".complete").write_text(mar.name, encoding="utf-8")
        try:
            staging.rename(dest)
        except OSError:  # another replica unpacked the same archive first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


class HandlerMismatch(Exception):
    """The archive carries different handler code than this app runs: the engines would not serve alike."""


def check_same_handler(model_dir: Path) -> None:
    """Refuse an archive whose handlers/ differ from the code this app runs, byte for byte.

    TorchServe runs the handler the archive carries; this app runs the installed one. Both are the same files only
    if the archive was built by this torchship: otherwise pre/post-processing could drift between the engines.
    """
    installed = Path(handlers.__file__).resolve().parent
    for name in HANDLER_PACKAGE_FILES:
        archived = model_dir / "handlers" / name
        if not archived.is_file() or archived.read_bytes() != (installed / name).read_bytes():
            raise HandlerMismatch(
                f"{model_dir.name}: handlers/{name} in the archive differs from the one this app runs; "
                "rebuild the archives with this torchship (`torchship archive`)"
            )


class RayContext:
    """TorchServe's context, as far as the handler uses it, for one Ray batch."""

    def __init__(self, model_dir: Path, headers: list[Mapping[str, str]], gpu_id: int | None = None) -> None:
        self._props: dict[str, Any] = {"model_dir": str(model_dir), "gpu_id": gpu_id}
        self.headers = headers
        self.statuses: dict[int, int] = {}
        self.response_headers: dict[int, dict[str, str]] = {}
        self.content_types: dict[int, str] = {}

    @property
    def system_properties(self) -> Mapping[str, Any]:
        return self._props

    def get_all_request_header(self, idx: int) -> Mapping[str, str]:
        return self.headers[idx]

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


Reply = tuple[int, bytes, dict[str, str]]


class Endpoint:
    """One endpoint (one .mar) as a Ray Serve deployment."""

    def __init__(self, mar: str, cache_dir: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.model_dir = unpack_mar(Path(mar), Path(cache_dir))
        check_same_handler(self.model_dir)
        gpu_id = 0 if os.environ.get("CUDA_VISIBLE_DEVICES") else None
        self.handler = TorchshipHandler()
        self.handler.initialize(RayContext(self.model_dir, [], gpu_id=gpu_id))
        self.gpu_id = gpu_id
        # Which Ray node answered: lets a multi-node deployment show that replicas on every node serve.
        self.node_id = ray.get_runtime_context().get_node_id()
        self.infer_batch.set_max_batch_size(max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer_batch(self, requests: list[tuple[bytes, dict[str, str]]]) -> list[Reply]:
        ctx = RayContext(self.model_dir, [h for _, h in requests], gpu_id=self.gpu_id)
        bodies = self.handler.handle([{"body": bytearray(b)} for b, _ in requests], ctx)
        if len(bodies) != len(requests):
            raise RuntimeError(f"handler answered {len(bodies)} of {len(requests)} requests")
        replies: list[Reply] = []
        for idx, body in enumerate(bodies):
            headers = dict(ctx.response_headers.get(idx, {}))
            headers["content-type"] = ctx.content_types.get(idx, "application/json")
            headers[NODE_HEADER] = self.node_id
            replies.append((ctx.statuses.get(idx, 200), body, headers))
        return replies

    async def infer(self, body: bytes, headers: dict[str, str]) -> Reply:
        reply: Reply = await self.infer_batch((body, headers))
        return reply

    def metadata(self) -> dict[str, Any]:
        sig = self.handler.signature

        def tensors(ts: tuple[TensorSignature, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {
            "name": self.handler.endpoint,
            "versions": [sig.version],
            "platform": f"pytorch_{self.handler.format}",
            "inputs": tensors(sig.inputs),
            "outputs": tensors(sig.outputs),
        }


def _json(status: int, doc: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(doc).encode("utf-8"), status_code=status, headers=dict(headers or {}), media_type="application/json"
    )


def _error(status: int, message: str) -> Response:
    return Response(encode_error(message), status_code=status, media_type="application/json")


class Ingress:
    """Routes TorchServe's and OIP v2's REST paths to the endpoint deployments; enforces the inference token."""

    def __init__(
        self, endpoints: dict[str, DeploymentHandle], versions: dict[str, str], token: str | None, max_request_bytes: int
    ) -> None:
        self.endpoints = endpoints
        self.versions = versions
        self.token = token
        self.max_request_bytes = max_request_bytes

    def _authorized(self, request: Request) -> bool:
        return not self.token or token_matches(request.headers.get("authorization"), self.token)

    async def __call__(self, request: Request) -> Response:
        # Empty segments are kept ("//predictions//x" is no route, as on TorchServe); one trailing slash is allowed.
        parts = request.url.path.split("/")[1:]
        if len(parts) > 1 and parts[-1] == "":
            parts = parts[:-1]
        method = request.method
        if parts in (["ping"], ["v2", "health", "live"], ["v2", "health", "ready"]):
            if method != "GET":
                return _error(405, f"{method} is not allowed on {request.url.path}; use GET")
            return _json(200, {"status": "Healthy"} if parts == ["ping"] else {"live": True, "ready": True})
        if len(parts) in (2, 3) and parts[0] == "predictions" and all(parts):
            # TorchServe hands /predictions/<model>[/<version>] to the handler whatever the method (a GET has no body
            # and gets 400); this app does the same, so both engines answer every request alike.
            return await self._infer(request, parts[1], version=parts[2] if len(parts) == 3 else None)
        if len(parts) == 3 and parts[:2] == ["v2", "models"]:
            return await self._metadata(request, parts[2])
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] in ("ready", "infer"):
            if parts[3] == "infer":
                if method != "POST":
                    return _error(405, f"{method} is not allowed; use POST")
                return await self._infer(request, parts[2])
            if method != "GET":
                return _error(405, "use GET")
            if parts[2] not in self.endpoints:
                return _error(404, f"unknown endpoint {parts[2]!r}")
            return _json(200, {"name": parts[2], "ready": True})
        return _error(404, f"no route for {request.url.path}")

    async def _metadata(self, request: Request, name: str) -> Response:
        if request.method != "GET":
            return _error(405, "use GET")
        if name not in self.endpoints:
            return _error(404, f"unknown endpoint {name!r}")
        return _json(200, await self.endpoints[name].metadata.remote())

    async def _infer(self, request: Request, name: str, version: str | None = None) -> Response:
        if not self._authorized(request):
            # The same status and wording TorchServe uses, so both engines have one access rule.
            return _error(TOKEN_STATUS, TOKEN_FAILED)
        if name not in self.endpoints:
            return _error(404, f"Model not found: {name}")
        if version is not None and version != self.versions.get(name):
            return _error(404, f"Model version: {version} does not exist for model: {name}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return _error(413, f"body is {declared} bytes; the limit is {self.max_request_bytes}")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            return _error(413, f"body is {len(body)} bytes; the limit is {self.max_request_bytes}")
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, payload, reply_headers = await self.endpoints[name].infer.remote(body, headers)
        return Response(payload, status_code=status, headers=reply_headers)


def _model_config(mar: Path) -> tuple[dict[str, Any], str]:
    """The archive's model-config.yaml and its model version."""
    with zipfile.ZipFile(mar) as z:
        config: dict[str, Any] = yaml.safe_load(z.read("model-config.yaml"))
        version = str(json.loads(z.read("manifest.json"))["version"])
    return config, version


def _token(args: Mapping[str, Any]) -> str | None:
    if args.get("token"):
        return str(args["token"])
    if args.get("token_file"):
        return Path(str(args["token_file"])).read_text(encoding="utf-8").strip()
    return inference_token(os.environ)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder. args: model_store (folder of .mar), cache_dir, token / token_file, num_cpus per
    replica (ingress_num_cpus for the ingress), num_gpus per endpoint replica (0: CPU), num_replicas,
    max_request_bytes. Batch size and wait come from each archive's model-config.yaml."""
    model_store = Path(args.get("model_store", "model_store")).resolve()
    cache_dir = str(Path(args.get("cache_dir", DEFAULT_CACHE)).resolve())
    mars = sorted(model_store.glob("*.mar"))
    if not mars:
        raise FileNotFoundError(f"no .mar files in {model_store}: run `torchship archive` first")
    num_cpus = float(args.get("num_cpus", 0.1))
    # Fractional GPUs let several endpoints share one device; Ray sets CUDA_VISIBLE_DEVICES for the replica.
    num_gpus = float(args.get("num_gpus", 0))
    actor_options: dict[str, float] = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}
    num_replicas = int(args.get("num_replicas", 1))
    handles: dict[str, serve.Application] = {}
    versions: dict[str, str] = {}
    for mar in mars:
        config, versions[mar.stem] = _model_config(mar)
        batch = int(config.get("batchSize", 8))
        wait_s = float(config.get("maxBatchDelay", 5)) / 1000.0
        deployment = serve.deployment(Endpoint).options(
            name=mar.stem,
            num_replicas=num_replicas,
            # Batches never exceed max_ongoing_requests: leave room for a full batch plus the next one forming.
            max_ongoing_requests=2 * batch,
            ray_actor_options=actor_options,
        )
        handles[mar.stem] = deployment.bind(str(mar), cache_dir, batch, wait_s)
    ingress_cpus = float(args.get("ingress_num_cpus", num_cpus))
    ingress = serve.deployment(Ingress).options(
        name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": ingress_cpus}
    )
    return ingress.bind(handles, versions, _token(args), int(args.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)))
