"""A one-hop Ray Serve app, measured in `make bench`'s design space and not served by torchship: the ingress replica
loads every endpoint's core itself (the same `EndpointCore`, unpacked and checked as an endpoint replica does) and
answers HTTP with no second Ray call. Batching is Ray's `@serve.batch` inside the ingress; the model runs on a worker
thread so the replica's event loop keeps reading requests while a batch computes.

What it leaves out, and why it is a bench row and not the default (docs/benchmarks.md): one process holds every
endpoint (a crash or a parity failure takes all of them), endpoints cannot scale or take GPUs apart, and a full
queue is not shed (Ray's max_queued_requests applies to handles, which this app has none of).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from ray import serve

from torchship.archive.mar import store_archives
from torchship.engines.ray.app import DEFAULT_CACHE, DRAIN_POLL_S, Ingress, _body_limit, _gpu_id, _token, unpack_checked
from torchship.handlers.core import EndpointCore, pick_device
from torchship.handlers.wire import Reply
from torchship.handlers.wire import Request as CoreRequest


class _Call:
    """`handle.method.remote(...)` for an object in this process: what Ingress calls its endpoints with."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class LocalEndpoint:
    """One endpoint's core inside the ingress replica, batched by Ray's batcher."""

    def __init__(self, mar: str, cache_dir: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        archive, model_dir = unpack_checked(mar, cache_dir, None, None)
        self.core = EndpointCore(model_dir, device=pick_device(_gpu_id()), environ=os.environ, model_config=archive.model_config)
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.infer = _Call(self._infer)
        self.metadata = _Call(self._metadata)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, requests: list[CoreRequest]) -> list[Reply]:
        replies = await asyncio.to_thread(self.core.infer_batch, requests)
        if len(replies) != len(requests):
            raise RuntimeError(f"handler answered {len(replies)} of {len(requests)} requests")
        return replies

    async def _infer(self, body: bytes, headers: dict[str, str]) -> Reply:
        reply: Reply = await self._batch(CoreRequest.of(body, headers))
        return reply

    async def _metadata(self) -> dict[str, Any]:
        return self.core.metadata()


class OneHopIngress(Ingress):
    """Ingress whose endpoints live in its own process."""

    def __init__(self, configs: dict[str, tuple[str, int, float]], cache_dir: str, versions: dict[str, str], token: str | None,
                 max_request_bytes: int, *, server_version: str) -> None:  # fmt: skip
        endpoints = {name: LocalEndpoint(mar, cache_dir, batch, wait_s) for name, (mar, batch, wait_s) in configs.items()}
        super().__init__(endpoints, versions, token, max_request_bytes, server_version)  # type: ignore[arg-type]


def app(args: dict[str, Any]) -> serve.Application:
    """The builder (`torchship.bench.one_hop:app`): model_store, cache_dir, token, max_request_bytes, num_cpus."""
    cache_dir = str(Path(args.get("cache_dir", DEFAULT_CACHE)).resolve())
    configs: dict[str, tuple[str, int, float]] = {}
    versions: dict[str, str] = {}
    for mar in store_archives(Path(args.get("model_store", "model_store")).resolve()):
        config = mar.model_config
        configs[mar.path.stem] = (str(mar.path), int(config.get("batchSize", 8)), float(config.get("maxBatchDelay", 5)) / 1000)
        versions[mar.path.stem] = mar.version
    from torchship import __version__

    ingress = serve.deployment(OneHopIngress).options(
        name="ingress",
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 0.1))},
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    )
    return ingress.bind(configs, cache_dir, versions, _token(args), _body_limit(args), server_version=__version__)
