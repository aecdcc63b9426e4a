"""Readiness of a TorchServe: every registered model has at least minWorkers workers READY.

stdlib only and quick to start: Kubernetes runs `python -m torchship.engines.torchserve.probe` as the pod's startup and
readiness probe (TorchServe's `/ping` says Healthy while models are still loading and while workers crash in a loop), and
`torchship.engines.torchserve.launcher.TorchServe` asks the same question locally.

Exit status: 0 ready, 1 not ready (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from torchship.errors import NotReady
from torchship.handlers.names import bearer

DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"


def _get(url: str, key: str | None, timeout_s: float) -> Any:
    request = urllib.request.Request(url, headers=bearer(key))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise NotReady(f"GET {url}: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise NotReady(f"GET {url}: {exc}") from None


def registered_models(management_url: str, key: str | None = None, timeout_s: float = 5.0) -> list[str]:
    doc = _get(f"{management_url.rstrip('/')}/models?limit=1000", key, timeout_s)
    return sorted(m["modelName"] for m in doc.get("models", []))


def _describe(management_url: str, name: str, key: str | None, timeout_s: float) -> Any:
    return _get(f"{management_url.rstrip('/')}/models/{urllib.parse.quote(name, safe='')}", key, timeout_s)[0]


def model_ready(management_url: str, name: str, key: str | None = None, timeout_s: float = 5.0) -> bool:
    """True when `name` has at least max(1, minWorkers) workers READY."""
    info = _describe(management_url, name, key, timeout_s)
    ready = sum(1 for w in info.get("workers", []) if w.get("status") == "READY")
    return ready >= max(1, int(info.get("minWorkers", 1)))


def worker_pids(management_url: str, name: str, key: str | None = None, timeout_s: float = 5.0) -> list[int]:
    """The process ids of `name`'s READY workers (what a fault test kills)."""
    info = _describe(management_url, name, key, timeout_s)
    return sorted(int(w["pid"]) for w in info.get("workers", []) if w.get("status") == "READY" and w.get("pid"))


def check(management_url: str, key: str | None = None, expected: int = 1) -> str:
    """Raise NotReady unless at least `expected` models are registered and all of them are ready."""
    models = registered_models(management_url, key)
    if len(models) < expected:
        raise NotReady(f"{len(models)} models registered, expected at least {expected}")
    pending = [m for m in models if not model_ready(management_url, m, key)]
    if pending:
        raise NotReady(f"workers not READY yet for {pending}")
    return f"{len(models)} models ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchship.engines.torchserve.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL)
    parser.add_argument("--key-file", default=None, help="TorchServe's key_file.json, when token auth is on")
    parser.add_argument("--expect", type=int, default=1, help="at least this many models must be registered")
    args = parser.parse_args(argv)
    key = None
    if args.key_file:
        with open(args.key_file, encoding="utf-8") as f:  # noqa: PTH123 - stdlib-only module, kept minimal
            key = json.load(f)["management"]["key"]
    try:
        print(check(args.management_url, key, args.expect))
    except NotReady as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
