"""OIP v2 REST checks shared by the TorchServe and the Ray Serve e2e modules (each runs them on its own server).

One table of what both engines answer alike, one per engine for what docs/rest.md ("OIP v2 REST") records as theirs
alone, and the stock clients: tritonclient[http] in this process, the kserve SDK in a subprocess (kserve_client.py:
kserve and tritonclient.grpc cannot share a process). Every inference is compared with the eager model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from torchship import __version__
from torchship.archive.mar import MarArchive
from torchship.handlers.codec import encode_request
from torchship.handlers.errors import TOKEN_FAILED
from torchship.handlers.wire import EMPTY_BODY
from torchship.models import ZOO
from torchship.reliability.corpus import error_message
from torchship.verify.load import HttpReply

#: The endpoint every OIP check uses (a 2-D FP32 input: cheap as JSON and as binary).
ENDPOINT = "dynamic_router"
KSERVE_CLIENT = Path(__file__).with_name("kserve_client.py")
VERSIONS_501 = {"error": "Model versioning is not yet supported."}
RAY_SERVER_METADATA = {"name": "torchship", "version": __version__, "extensions": ["binary_tensor_data"]}


@dataclass(frozen=True)
class Route:
    """One request and the answer it must get: the status, and the whole JSON body or a piece of the error text."""

    label: str
    method: str
    #: "{m}" stands for ENDPOINT.
    path: str
    status: int
    body: dict[str, Any] | None = None
    message: str | None = None
    token: bool = True
    #: Send a valid inference request as the body.
    payload: bool = False


#: The same status, and the same body or error text, on both engines.
BOTH = (
    Route("live", "GET", "/v2/health/live", 200, body={"live": True}),
    Route("live, any method", "POST", "/v2/health/live", 200, body={"live": True}),
    Route("ready", "GET", "/v2/health/ready", 200, body={"ready": True}),
    Route("ping", "GET", "/ping", 200, body={"status": "Healthy"}),
    Route("infer", "POST", "/v2/models/{m}/infer", 200, payload=True),
    Route("infer, any method", "PUT", "/v2/models/{m}/infer", 200, payload=True),
    Route("infer, name cut at ':'", "POST", "/v2/models/{m}:v1/infer", 200, payload=True),
    Route("infer, GET has no body", "GET", "/v2/models/{m}/infer", 400, message=EMPTY_BODY),
    Route("infer, unknown endpoint", "POST", "/v2/models/nope/infer", 404, message="Model not found: nope", payload=True),
    Route("explain", "POST", "/v2/models/{m}/explain", 404, message="serves no explanations", payload=True),
    Route("infer without the token", "POST", "/v2/models/{m}/infer", 400, message=TOKEN_FAILED, token=False, payload=True),
    Route("versions: metadata", "GET", "/v2/models/{m}/versions/1.0", 501, body=VERSIONS_501),
    Route("versions: infer", "POST", "/v2/models/{m}/versions/1.0/infer", 501, body=VERSIONS_501, payload=True),
    Route("model ready", "GET", "/v2/models/{m}/ready", 200, body={"name": ENDPOINT, "ready": True}),
    Route("model ready, unknown", "GET", "/v2/models/nope/ready", 404, message="Model not found: nope"),
    Route("model ready, not GET", "POST", "/v2/models/{m}/ready", 405, message="use GET"),
    Route("metadata, unknown", "GET", "/v2/models/nope", 404, message="Model not found: nope"),
    Route("metadata, not GET", "PUT", "/v2/models/{m}", 405, message="use GET"),
    Route("metadata, trailing slash", "GET", "/v2/models/{m}/", 200),
    Route("metadata, trailing slashes", "GET", "/v2/models/{m}//", 200),
    Route("infer, trailing slashes", "POST", "/v2/models/{m}/infer//", 200, payload=True),
    Route("infer, empty segment", "POST", "/v2/models//{m}/infer", 404, payload=True),
)
#: TorchServe's frontend checks its key on every path of its inference port.
TORCHSERVE_ONLY = (
    Route("live without the token", "GET", "/v2/health/live", 400, message=TOKEN_FAILED, token=False),
    Route("metadata without the token", "GET", "/v2/models/{m}", 400, message=TOKEN_FAILED, token=False),
    Route("server metadata", "GET", "/v2", 200),
)
RAY_ONLY = (
    Route("live without the token", "GET", "/v2/health/live", 200, body={"live": True}, token=False),
    Route("metadata without the token", "GET", "/v2/models/{m}", 200, token=False),
    Route("server metadata", "GET", "/v2", 200, body=RAY_SERVER_METADATA),
    Route("server metadata, not GET", "POST", "/v2", 405, message="use GET"),
)


def inputs(batch: int, seed: int) -> torch.Tensor:
    return ZOO[ENDPOINT].make_inputs(batch, seed_offset=seed)["x"]


def assert_eager(y: Any, x: torch.Tensor, store: Path, label: str) -> None:
    """y (a tensor or an array) equals the eager model on x within the served format's tolerance."""
    atol, rtol = MarArchive(store / f"{ENDPOINT}.mar").tolerance
    served = torch.from_numpy(np.array(y, dtype=np.float32)).reshape(x.shape[0], -1)
    with torch.no_grad():
        assert torch.allclose(served, ZOO[ENDPOINT].factory()(x), atol=atol, rtol=rtol), label


def route_mismatches(url: str, auth: dict[str, str], routes: tuple[Route, ...]) -> list[str]:
    """Every route whose answer is not the one the table says, with what came back."""
    problems = []
    payload, payload_headers = encode_request({"x": inputs(2, seed=31)})
    for r in routes:
        headers = {**(auth if r.token else {}), **(payload_headers if r.payload else {})}
        reply = requests.request(r.method, url + r.path.format(m=ENDPOINT), headers=headers,
                                 data=payload if r.payload else None, timeout=60)  # fmt: skip
        got = HttpReply(reply.status_code, reply.content, {k.lower(): v for k, v in reply.headers.items()})
        message = error_message(got) or ""
        ok = got.status == r.status
        if r.body is not None:
            ok = ok and reply.headers.get("content-type", "").startswith("application/json") and reply.json() == r.body
        if r.message is not None:
            ok = ok and r.message in message
        if r.status == 200 and r.payload:
            ok = ok and list(json.loads(got.body)["outputs"][0]["shape"]) == [2, 256]
        if not ok:
            problems.append(f"{r.label}: {r.method} {r.path} -> {got.status} {got.body[:200]!r}")
    return problems


def expected_metadata(store: Path) -> dict[str, Any]:
    """GET /v2/models/<m> as the archive's manifest gives it (both engines' answer), written out here from the
    manifest rather than read from the archive's oip-metadata.json, so the document itself is checked."""
    mar = MarArchive(store / f"{ENDPOINT}.mar")

    def tensors(key: str) -> list[dict[str, Any]]:
        return [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]} for t in mar.manifest[key]]

    return {"name": ENDPOINT, "versions": [mar.version], "platform": f"pytorch_{mar.format}",
            "inputs": tensors("inputs"), "outputs": tensors("outputs")}  # fmt: skip


def run_tritonclient(url: str, headers: dict[str, str], x: torch.Tensor) -> dict[str, Any]:
    """tritonclient[http]: health, model ready, metadata (or its error), a JSON and a binary inference."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    out: dict[str, Any] = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(ENDPOINT, headers=headers),
        "server": client.get_server_metadata(headers=headers),
    }
    try:
        out["metadata"] = client.get_model_metadata(ENDPOINT, headers=headers)
    except InferenceServerException as exc:
        out["metadata"] = {"error_status": exc.status(), "error": exc.message()}
    for binary in (False, True):
        infer_input = httpclient.InferInput("x", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x.numpy().astype(np.float32), binary_data=binary)
        result = client.infer(ENDPOINT, [infer_input], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
                              headers=headers)  # fmt: skip
        out["binary" if binary else "json"] = result.as_numpy("y")
    client.close()
    return out


def run_kserve_client(url: str, headers: dict[str, str], x: torch.Tensor) -> dict[str, Any]:
    """The kserve SDK's InferenceRESTClient, in its own process (see kserve_client.py)."""
    spec = {"url": url, "endpoint": ENDPOINT, "headers": headers, "outputs": ["y"],
            "inputs": {"x": {"shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}}}  # fmt: skip
    proc = subprocess.run([sys.executable, str(KSERVE_CLIENT)], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc
