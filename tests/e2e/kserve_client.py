"""The kserve SDK's REST client (`kserve.InferenceRESTClient`, OIP v2) against a running server, as a script.

`import kserve` and `import tritonclient.grpc` cannot share a Python process (both register protobuf's
`inference.ServerLiveRequest`), so no test module imports kserve: tests run this file with the venv's python. It
reads one JSON document on stdin, {"url", "endpoint", "headers", "inputs": {name: {"shape", "datatype", "data"}}},
and prints one JSON document: what the client returned for live, ready and model ready, and the outputs of a JSON
inference and of a binary one (binary inputs and binary outputs), each {"shape", "datatype", "data"} or
{"error": "<status> <message>"}. The kserve 0.21 REST client has no model-metadata call.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64}


def _request(spec: dict[str, Any], *, binary: bool) -> InferRequest:
    inputs = []
    for name, t in spec["inputs"].items():
        infer_input = InferInput(name, t["shape"], t["datatype"])
        infer_input.set_data_from_numpy(np.asarray(t["data"], dtype=NUMPY_TYPES[t["datatype"]]).reshape(t["shape"]),
                                        binary_data=binary)  # fmt: skip
        inputs.append(infer_input)
    outputs = [RequestedOutput(name, {"binary_data": True}) for name in spec["outputs"]] if binary else None
    return InferRequest(model_name=spec["endpoint"], infer_inputs=inputs, request_outputs=outputs)


async def _infer(client: InferenceRESTClient, spec: dict[str, Any], *, binary: bool) -> dict[str, Any]:
    try:
        response = await client.infer(spec["url"], _request(spec, binary=binary), model_name=spec["endpoint"],
                                      headers=dict(spec["headers"]))  # fmt: skip
    except Exception as exc:  # the client's HTTPStatusError or a decoding error: reported, the test decides
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        o.name: {"shape": list(o.shape), "datatype": o.datatype, "data": o.as_numpy().reshape(-1).tolist()}
        for o in response.outputs
    }


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    url, headers = spec["url"], dict(spec["headers"])
    try:
        return {
            "live": await client.is_server_live(url, headers=headers),
            "ready": await client.is_server_ready(url, headers=headers),
            "model_ready": await client.is_model_ready(url, spec["endpoint"], headers=headers),
            "json": await _infer(client, spec, binary=False),
            "binary": await _infer(client, spec, binary=True),
        }
    finally:
        await client.close()


def main() -> int:
    print(json.dumps(asyncio.run(run(json.load(sys.stdin)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
