"""The PyTriton peer: what a user writes by following PyTriton's docs, serving the same frozen TorchScript file.
`Triton` with its ports on 127.0.0.1, the model bound with an `@batch` infer function and Triton's dynamic batcher;
Triton's own OIP v2 HTTP endpoint answers at /v2/models/<name>/infer.

Run by the peers' own interpreter (torchship.bench.peers.outside), never imported by torchship:
    python pytriton_peer.py --model FILE --http-port N --grpc-port M --metrics-port P
                            --max-batch-size B --max-queue-delay-us U [--workspace DIR] [--log-batches]
"""

# The peers' packages live in their own venv, not in the one mypy runs in: their imports are unresolved there.
# mypy: allow-untyped-decorators
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytriton.decorators import batch  # type: ignore[import-not-found]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]

MODEL_NAME = "simple_cnn_stock"
LOOPBACK = "127.0.0.1"


def infer_function(model_file: str, *, log_batches: bool) -> Any:
    model = torch.jit.load(model_file).eval()

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        if log_batches:
            print(f"batch {x.shape[0]}", file=sys.stderr, flush=True)
        with torch.inference_mode():
            return {"logits": model(torch.from_numpy(x)).numpy()}

    return infer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the frozen TorchScript file")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--max-queue-delay-us", type=int, required=True, help="the dynamic batcher's wait to fill a batch")
    parser.add_argument("--workspace", type=Path, default=None, help="PyTriton's sockets and model store (default: a temp dir)")
    parser.add_argument("--log-batches", action="store_true", help="print each batch's rows to stderr")
    args = parser.parse_args(argv)
    config = TritonConfig(
        http_address=LOOPBACK, http_port=args.http_port, grpc_address=LOOPBACK, grpc_port=args.grpc_port,
        metrics_address=LOOPBACK, metrics_port=args.metrics_port,
    )  # fmt: skip
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer_function(args.model, log_batches=args.log_batches),
            # Height and width are free: the bench sends 3x32x32 and 3x224x224 images (the CNN pools adaptively).
            inputs=[Tensor(name="x", dtype=np.float32, shape=(3, -1, -1))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
