"""The kserve SDK's gRPC client (`kserve.InferenceGRPCClient`, OIP v2 gRPC) against the Ray app, as a script.

`import kserve` and `import tritonclient.grpc` cannot share a Python process (both register protobuf's
`inference.ServerLiveRequest`), so tests run this file with the venv's python. It reads one JSON document on stdin,
{"address", "endpoint", "metadata": [[key, value], ...], "inputs": {name: {"shape", "datatype", "data"}}}, and prints
one JSON document: what the client returned for live, ready and model ready, and the outputs of an inference with
raw contents and of one with typed contents, each {name: {"shape", "datatype", "data"}} or {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64}


async def _infer(client: InferenceGRPCClient, spec: dict[str, Any], *, raw: bool) -> dict[str, Any]:
    inputs = []
    for name, t in spec["inputs"].items():
        infer_input = InferInput(name, t["shape"], t["datatype"])
        array = np.asarray(t["data"], dtype=NUMPY_TYPES[t["datatype"]]).reshape(t["shape"])
        infer_input.set_data_from_numpy(array, binary_data=raw)
        inputs.append(infer_input)
    request = InferRequest(model_name=spec["endpoint"], infer_inputs=inputs, request_id="kserve-grpc")
    metadata = [(k, v) for k, v in spec["metadata"]]
    try:
        response = await client.infer(request, headers=metadata)
    except Exception as exc:  # the client's grpc error or a decoding error: reported, the test decides
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {
        o.name: {"shape": list(o.shape), "datatype": o.datatype, "data": o.as_numpy().flatten().tolist()}
        for o in response.outputs
    }


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    client = InferenceGRPCClient(spec["address"], timeout=60)
    try:
        return {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(spec["endpoint"]),
            "raw": await _infer(client, spec, raw=True),
            "typed": await _infer(client, spec, raw=False),
        }
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.load(sys.stdin)))))
