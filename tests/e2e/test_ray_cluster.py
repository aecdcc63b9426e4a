"""A real two-node Ray cluster on this machine (a head and a worker joined over 127.0.0.1 with `ray start`): the app's
replicas spread over both nodes, and replicas on each node answer correctly."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from torchship.archive.build import archive_default_endpoint, load_model_config
from torchship.engines.base import free_port
from torchship.engines.ray.launcher import INGRESS_DRAINING_S, haproxy_files
from torchship.settings import default_body_limit_bytes, ray_serve_env

RAY = Path(sys.executable).parent / "ray"


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(RAY), "start", "--block", *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to `ray start --block` alone: it stops its node's processes itself (2 s here; SIGTERM to the whole
    process group took 33 s), then SIGKILL to whatever of the group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _wait_for_port(port: int, node: subprocess.Popen[bytes], log: Path, timeout_s: float = 90.0) -> None:
    """Until the head's GCS accepts connections on 127.0.0.1:port (the worker node and the driver join through it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert node.poll() is None, f"the head node exited:\n{log.read_text()[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"no GCS on port {port} after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.25)


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray, torch
    from ray import serve
    from torchship.engines.ray.app import app
    from torchship.handlers.codec import encode_request
    from torchship.models import ZOO
    from torchship.spec import Tolerance
    from torchship.verify import load

    address, store, cache, http_port = sys.argv[1:5]
    ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + 90
    while len(nodes := sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the worker node joins a few seconds after `ray start` returns
    serve.start(http_options={"host": "127.0.0.1", "port": int(http_port)}, proxy_location="HeadOnly")
    # 0.6 CPU per replica on 1-CPU nodes: two replicas cannot share a node, so they must spread.
    serve.run(app({"model_store": store, "cache_dir": cache, "num_replicas": 2, "num_cpus": 0.6, "ingress_num_cpus": 0}),
              name="torchship", route_prefix="/", blocking=False)
    spec = ZOO["dynamic_router"]
    eager = spec.factory()
    pool = []
    for i in range(80):
        x = spec.make_inputs(1 + i % 4, seed_offset=i)["x"]
        with torch.no_grad():
            check = load.expect_outputs(("y",), (eager(x),), Tolerance(1e-5, 1e-4))
        pool.append(load.LoadRequest("dynamic_router", *encode_request({"x": x}), check))
    # The one checked load loop, one client, every request once, in order; which node answered is kept.
    shots = load.run_load(f"http://127.0.0.1:{http_port}", pool, clients=1, requests_total=len(pool),
                          keep_headers=("X-Torchship-Node",))
    assert all(s.status == 200 for s in shots), [s.detail for s in shots if s.status != 200][:3]
    seen = {}
    for s in shots:
        node = s.headers["x-torchship-node"]
        seen[node] = seen.get(node, 0) + 1
    serve.shutdown()
    print(json.dumps({"nodes": nodes, "answered_by": seen, "wrong": sum(s.outcome != "ok" for s in shots)}))
    """
)


@pytest.mark.slow
def test_replicas_on_both_nodes_answer_correctly(artifacts_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    # One endpoint: its 2 replicas must fill both 1-CPU nodes.
    archive_default_endpoint("dynamic_router", artifacts=artifacts_dir, out_dir=store, model_config=load_model_config())
    temp = Path(f"/tmp/ts-ray-{secrets.token_hex(3)}")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # Ray token auth on for every process of the cluster (head, worker, driver), with one per-test token.
    # HAProxy and the throughput bundle on every node, as the RayService's containers run them; the local child's
    # short ingress drain (Ray's 30 s minimum made serve.shutdown time out after 30 s).
    serve_env = {**ray_serve_env(default_body_limit_bytes()), **haproxy_files(temp / "haproxy"), **INGRESS_DRAINING_S}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           **serve_env}  # fmt: skip
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    head = _start_node(
        ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp), *common],
        env,
        tmp_path / "head.log",
    )
    worker = None
    try:
        _wait_for_port(port, head, tmp_path / "head.log")
        worker = _start_node(["--address", f"127.0.0.1:{port}", *common], env, tmp_path / "worker.log")
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(store), str(tmp_path / "cache"), str(free_port())],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:] + (tmp_path / "head.log").read_text()[-2000:]
        # Ray's raylet may print a line of its own after the driver's report.
        result = json.loads(next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")))
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert len(result["nodes"]) == 2, result
    assert result["wrong"] == 0
    assert set(result["answered_by"]) == set(result["nodes"]), f"not every node answered: {result}"
    deadline = time.monotonic() + 10  # killed processes take a moment to go
    while left := subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"Ray processes left running: {left}"
        time.sleep(0.5)
