"""The stock peer on Ray Serve: what a user writes by following Ray Serve's docs, serving the same frozen TorchScript
file. One `serve.deployment` whose `__call__` reads an OIP v2 JSON body with `request.json()` and `torch.tensor`,
and `@serve.batch` (the same batch size and wait as torchship's endpoint) around the model; OIP v2 JSON back.
Deployment options are Ray's defaults, as a user who follows the docs leaves them.

`app(args)` is the builder the Ray child (torchship.engines.ray.launcher) runs with
`--app torchship.bench.peers.ray_stock_app:app`; args["model_store"] is the folder holding `model.torchscript.pt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ray import serve
from starlette.requests import Request

MODEL_FILE = "model.torchscript.pt"


class StockModel:
    def __init__(self, path: str) -> None:
        self.model = torch.jit.load(path).eval()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = self.model(torch.cat(xs))
        return list(torch.split(out, [x.shape[0] for x in xs]))

    async def __call__(self, request: Request) -> dict[str, Any]:
        doc = await request.json()
        tensor = doc["inputs"][0]
        y = await self.run(torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"]))
        return {"model_name": "stock", "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(y.shape),
                                                    "data": y.flatten().tolist()}]}  # fmt: skip


def app(args: dict[str, Any]) -> serve.Application:
    deployment = serve.deployment()(StockModel)  # `@serve.deployment()` in call form: Ray's defaults
    return deployment.bind(str(Path(args["model_store"]) / MODEL_FILE))
