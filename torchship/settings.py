"""The settings torchship ships, and where a command finds them.

configs/ travels inside the package (package data): config.properties (TorchServe's settings and the body limit
both engines enforce), model-config.yaml and model-config.gpu.yaml (an archive's batching, workers and timeouts) and
ray-serve.yaml (the Ray Serve config KubeRay runs). `torchship init DIR` writes editable copies; a command reads
those when asked (`--config-dir DIR`, or TORCHSHIP_CONFIG_DIR), the packaged ones otherwise. Never the checkout.

The drain timings live here too: the engines' drains and the manifests' grace periods (deploy check) use the same.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from torchship.errors import ConfigError

#: A folder of the user's own copies of the settings files (`torchship init`), when set.
CONFIG_DIR_ENV = "TORCHSHIP_CONFIG_DIR"
CONFIG_PROPERTIES = "config.properties"
MODEL_CONFIG = "model-config.yaml"
MODEL_CONFIG_GPU = "model-config.gpu.yaml"
RAY_SERVE_CONFIG = "ray-serve.yaml"
CONFIG_FILES = (CONFIG_PROPERTIES, MODEL_CONFIG, MODEL_CONFIG_GPU, RAY_SERVE_CONFIG)

#: TorchServe's frontend answers a body over its max_request_size with an empty 413 before any handler runs. The
#: handler enforces the configured limit itself (JSON 413, like the Ray app); the frontend's cut sits this much higher.
FRONTEND_LIMIT_FACTOR = 2

#: The pods' preStop window: the time Kubernetes takes to take a terminating pod out of its Services' endpoints.
POD_WINDOW_S = 5.0
#: How long a drain's markers may take, in all, to come back (after the window).
FLUSH_TIMEOUT_S = 20.0
#: What a pod's terminationGracePeriodSeconds must leave TorchServe to stop after the drain (the whole local drain
#: and stop took 2.6 s in `make reliability`; generous, since a slow node is slower).
STOP_ALLOWANCE_S = 10.0

#: Ray Serve's settings for every Ray torchship runs (`torchship serve ray`, and the RayService's Ray containers, which
#: `deploy check` holds to these), each measured in `make bench`'s design table (docs/benchmarks.md): Ray 2.60's
#: throughput bundle (direct ingress, gRPC between replicas, user code and the router on the replica's own loop,
#: buffered request logs, GC frozen after start) and HAProxy on Serve's port in front of the ingress replicas.
RAY_SERVE_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
#: The bundle sends requests between replicas over gRPC, whose replica servers take 4 MiB messages by default: every
#: request above that failed with a 500 (found by the bench's 9 MiB bodies). The limit follows the body limit.
RAY_SERVE_MESSAGE_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


def ray_serve_env(body_limit_bytes: int) -> dict[str, str]:
    """RAY_SERVE_DEFAULTS and the replica's gRPC message limit for a body limit: FRONTEND_LIMIT_FACTOR times it, room
    for the request's headers and a reply larger than the request."""
    return {**RAY_SERVE_DEFAULTS, RAY_SERVE_MESSAGE_LIMIT_ENV: str(body_limit_bytes * FRONTEND_LIMIT_FACTOR)}


def packaged_configs() -> Path:
    """The configs/ folder inside the installed package."""
    return Path(str(resources.files("torchship") / "configs"))


def config_dir() -> Path:
    """Where settings are read from: TORCHSHIP_CONFIG_DIR when set, the packaged defaults otherwise."""
    chosen = os.environ.get(CONFIG_DIR_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_dir():
            raise ConfigError(
                f"the config folder {chosen} (--config-dir or {CONFIG_DIR_ENV}) does not exist; "
                f"write it with `torchship init {chosen}`"
            )
        return path
    return packaged_configs()


def config_file(name: str) -> Path:
    """One settings file (a CONFIG_FILES name), from config_dir()."""
    path = config_dir() / name
    if not path.is_file():
        where = f"the config folder {path.parent} ({CONFIG_DIR_ENV})" if os.environ.get(CONFIG_DIR_ENV) else "the package"
        raise ConfigError(f"{name} is missing from {where}; `torchship init DIR` writes every settings file into DIR")
    return path


def read_properties(path: Path) -> dict[str, str]:
    """A Java .properties file as TorchServe reads ours: `key=value` lines, `#` comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    props: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and "=" in stripped:
            key, _, value = stripped.partition("=")
            props[key.strip()] = value.strip()
    return props


def default_body_limit_bytes(config: Path | None = None) -> int:
    """The request body limit both engines enforce: config.properties' `max_request_size`."""
    path = config or config_file(CONFIG_PROPERTIES)
    value = read_properties(path).get("max_request_size")
    if value is None or not value.isdigit():
        raise ConfigError(f"{path} must set max_request_size to a number of bytes, not {value!r}")
    return int(value)


def init_configs(target: Path, *, force: bool = False) -> list[Path]:
    """Write editable copies of every settings file into target; refuses to overwrite unless force."""
    target.mkdir(parents=True, exist_ok=True)
    existing = [target / n for n in CONFIG_FILES if (target / n).exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise ConfigError(f"{target} already holds {names}; pass --force to overwrite them")
    written = []
    for name in CONFIG_FILES:
        dest = target / name
        dest.write_bytes((packaged_configs() / name).read_bytes())
        written.append(dest)
    return written
