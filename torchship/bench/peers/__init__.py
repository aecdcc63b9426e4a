"""The stock peers `make bench` serves next to torchship on each engine: the same frozen TorchScript file behind what
a user writes by following the engine's own docs (ts_stock_handler.py on TorchServe, ray_stock_app.py on Ray Serve).
They speak OIP v2 JSON only. Every peer answer is decoded and checked against the model's own output like ours."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import requests
import torch
import yaml

from torchship.archive.build import archiver
from torchship.engines.ray.launcher import RayServe
from torchship.errors import ArchiveError, EngineError, NotReady
from torchship.handlers.codec import encode_request
from torchship.handlers.names import MODEL_CONFIG_FILE

#: The peer's endpoint name on both engines.
PEER = "simple_cnn_stock"
HANDLER = Path(__file__).parent / "ts_stock_handler.py"
RAY_APP = "torchship.bench.peers.ray_stock_app:app"


def stock_torchserve_archive(model_file: Path, store: Path, model_config: dict[str, Any]) -> Path:
    """`PEER.mar`: the TorchScript file and the stock handler, through the real torch-model-archiver, with the same
    model config (batching) as torchship's endpoint."""
    with tempfile.TemporaryDirectory(prefix="torchship-peer-") as tmp:
        config = Path(tmp) / MODEL_CONFIG_FILE
        config.write_text(yaml.safe_dump(model_config), encoding="utf-8")
        cmd = [
            archiver(), "--model-name", PEER, "--version", "1.0", "--serialized-file", str(model_file),
            "--handler", str(HANDLER), "--config-file", str(config), "--export-path", str(store), "--force",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        if proc.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed on the stock peer: {proc.stderr.strip() or proc.stdout.strip()}")
    return store / f"{PEER}.mar"


def stock_ray_store(model_file: Path, folder: Path) -> Path:
    """The Ray peer's folder: just the TorchScript file, as a user's app would load it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / "model.torchscript.pt")
    return folder


def peer_answers(url: str) -> bool:
    """True when the stock peer at `url` answers a real request (it has no readiness route)."""
    body, headers = encode_request({"x": torch.zeros(1, 3, 32, 32)})
    try:
        return requests.post(url, data=body, headers=headers, timeout=5).status_code == 200
    except requests.RequestException as exc:
        raise NotReady(str(exc)) from None


def wait_answering(url: str, timeout_s: float = 300.0) -> None:
    """Until the stock peer at `url` answers; EngineError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(NotReady):
            if peer_answers(url):
                return
        if time.monotonic() > deadline:
            raise EngineError(f"the stock peer at {url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


class StockRayServe(RayServe):
    """Ray Serve running the stock peer app (the same child, Ray settings and loopback port as torchship's)."""

    name: ClassVar[str] = "ray"

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        super().__init__(model_dir, workdir, app=RAY_APP)
        self.endpoints = [PEER]

    def _ready(self, endpoint: str) -> bool:
        """The stock app has no readiness route: ready when a real request is answered."""
        return peer_answers(f"{self.url}/predictions/{endpoint}")


__all__ = ["PEER", "RAY_APP", "StockRayServe", "peer_answers", "stock_ray_store", "stock_torchserve_archive", "wait_answering"]
