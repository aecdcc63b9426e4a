"""The stock peer on TorchServe: what a user writes by following TorchServe's custom-handler docs, serving the same
frozen TorchScript file. `BaseHandler` loads the serialized file; preprocess reads an OIP v2 JSON body with
`json.loads` and `torch.tensor`; postprocess answers OIP v2 JSON. No validation beyond what Python raises.

Archived by `torchship.bench.peers.stock_torchserve_archive` with the real torch-model-archiver (`--handler` this file).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler


class StockHandler(BaseHandler):  # type: ignore[misc]  # TorchServe's base class is untyped
    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        rows = []
        for item in data:
            body = item.get("body") or item.get("data")
            doc: Any = json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
            tensor = doc["inputs"][0]
            rows.append(torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"]))
        self.sizes = [r.shape[0] for r in rows]
        return torch.cat(rows).to(self.device)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(data)
        return out

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {"model_name": "stock", "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(part.shape),
                                                 "data": part.flatten().tolist()}]}
            for part in torch.split(data.cpu(), self.sizes)
        ]  # fmt: skip
