"""The LitServe peer: what a user writes by following LitServe's docs, serving the same frozen TorchScript file.
A `LitAPI` whose setup loads the file, decode_request reads an OIP v2 JSON body into a tensor, batch/predict/unbatch
run LitServe's own batching, and encode_response answers OIP v2 JSON; on 127.0.0.1 at /v2/models/<name>/infer.

Run by the peers' own interpreter (torchship.bench.peers.outside), never imported by torchship:
    python litserve_peer.py --model FILE --port N --max-batch-size B --batch-timeout S
                            [--workers-per-device W] [--fast-queue] [--num-api-servers A] [--log-batches]
The last switches are LitServer's documented throughput settings; left out, each is LitServe's default.
"""

# The peers' packages live in their own venv, not in the one mypy runs in: their imports are unresolved there.
# mypy: allow-subclassing-any
from __future__ import annotations

import argparse
import sys
from typing import Any

import litserve as ls  # type: ignore[import-not-found]
import torch

MODEL_NAME = "simple_cnn_stock"
OUTPUT = "logits"


class StockCNN(ls.LitAPI):
    def __init__(self, model_file: str, *, log_batches: bool, **options: Any) -> None:
        super().__init__(**options)
        self.model_file = model_file
        self.log_batches = log_batches

    def setup(self, device: str) -> None:
        self.model = torch.jit.load(self.model_file, map_location=device).eval()

    # Unannotated on purpose, as in LitServe's docs: LitServe takes an annotation as the request's FastAPI body type
    # (seen: `dict[str, Any]` answered 422); without one it hands over the JSON body, parsed.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        tensor = request["inputs"][0]
        return torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # LitServe's default stacks the inputs; an OIP v2 request carries its own batch dim (one or more rows), so
        # predict concatenates them and hands each request back its own rows.
        return inputs

    def predict(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        with torch.inference_mode():
            if not isinstance(x, list):  # max_batch_size 1: LitServe calls predict per request, no batch()
                y: torch.Tensor = self.model(x)
                return y
            if self.log_batches:
                print(f"batch {len(x)}", file=sys.stderr, flush=True)
            out = self.model(torch.cat(x))
        return list(torch.split(out, [t.shape[0] for t in x]))

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        return output

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"model_name": MODEL_NAME, "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": list(output.shape),
                                                       "data": output.flatten().tolist()}]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the frozen TorchScript file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--batch-timeout", type=float, required=True, help="seconds LitServe waits to fill a batch")
    parser.add_argument("--workers-per-device", type=int, default=1, help="inference worker processes (default 1)")
    parser.add_argument("--fast-queue", action="store_true", help="ZeroMQ between the API servers and the workers")
    parser.add_argument("--num-api-servers", type=int, default=None, help="HTTP server processes (default: one a worker)")
    parser.add_argument("--log-batches", action="store_true", help="print each batch's size to stderr")
    args = parser.parse_args(argv)
    api = StockCNN(
        args.model,
        log_batches=args.log_batches,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=f"/v2/models/{MODEL_NAME}/infer",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers_per_device, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.num_api_servers, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
