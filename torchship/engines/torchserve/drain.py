"""Graceful drain of a TorchServe: what `torchship serve torchserve` does on SIGTERM, and what a TorchServe pod's
preStop hook runs (`python -m torchship.engines.torchserve.drain`) before Kubernetes sends SIGTERM.

TorchServe closes its listeners and stops its workers at once on SIGTERM: requests it had accepted are reset. So the
drain happens before the signal: keep answering for a window (a load balancer's time to stop sending), then write a
random marker into the handler's drain file and send every endpoint one request carrying it (X-Torchship-Drain).
TorchServe queues the marker behind every request it already took for that endpoint; the handler answers those as
usual and the marker, and anything behind it, with a JSON 503. So the marker's 503 coming back means the endpoint
has nothing accepted left (exact with one worker per model; with more, another worker may still be finishing a
batch it took earlier). stdlib only and quick to start, like probe.py.

Exit status: 0 drained, 1 an endpoint's probe did not come back in time (the engine is stopped anyway).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from torchship.handlers.names import (
    DRAIN_FILE_ENV,
    DRAIN_HEADER,
    DRAINING_MESSAGE,
    ENDPOINT_FILE,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    bearer,
)
from torchship.settings import FLUSH_TIMEOUT_S, POD_WINDOW_S


def _marker_answered(url: str, endpoint: str, marker: str, token: str | None, timeout_s: float) -> bool:
    """True when the endpoint answered the marker request with the handler's drain 503."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predictions/{endpoint}",
        data=b"{}",
        headers={"Content-Type": "application/json", DRAIN_HEADER: marker, **bearer(token)},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
        return False
    except urllib.error.HTTPError as exc:
        return exc.code == 503 and DRAINING_MESSAGE in exc.read().decode("utf-8", "replace")
    except OSError:
        return False


def drain(
    url: str,
    endpoints: Sequence[str],
    drain_file: Path,
    *,
    token: str | None,
    window_s: float,
    timeout_s: float = FLUSH_TIMEOUT_S,
) -> list[str]:
    """Run the drain; return the endpoints whose marker did not come back within `timeout_s` (none when drained)."""
    time.sleep(window_s)
    marker = secrets.token_hex(16)
    written = drain_file.with_name(f".{drain_file.name}.{os.getpid()}")
    written.write_text(marker, encoding="utf-8")
    written.replace(drain_file)  # the handler never reads half a marker
    deadline = time.monotonic() + timeout_s
    pending: list[str] = []

    def flush(endpoint: str) -> None:
        while time.monotonic() < deadline:
            if _marker_answered(url, endpoint, marker, token, max(0.1, deadline - time.monotonic())):
                return
            time.sleep(0.05)
        pending.append(endpoint)

    # Every endpoint at once: one that is still flushing must not keep another one answering new requests.
    threads = [threading.Thread(target=flush, args=(e,), name=f"drain-{e}", daemon=True) for e in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(pending)


def markable(model_store: Path, endpoints: Sequence[str]) -> list[str]:
    """The endpoints whose handler answers the drain marker: torchship's own archives (they carry endpoint.json). An
    archive's own TorchServe handler knows no marker: it would take the probe for a request, so it gets the window
    only (docs/migrate.md, what differs)."""
    own: list[str] = []
    for endpoint in endpoints:
        try:
            with zipfile.ZipFile(model_store / f"{endpoint}.mar") as z:
                if ENDPOINT_FILE in z.namelist():
                    own.append(endpoint)
        except (OSError, zipfile.BadZipFile):
            continue
    return own


def _token_from_env() -> str | None:
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    if path := os.environ.get(TOKEN_FILE_ENV):
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchship.engines.torchserve.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe's inference address")
    parser.add_argument("--model-store", required=True, help="the folder of .mar files TorchServe serves")
    parser.add_argument("--drain-file", default=os.environ.get(DRAIN_FILE_ENV), help=f"default: ${DRAIN_FILE_ENV}")
    parser.add_argument("--window-s", type=float, default=POD_WINDOW_S, help=f"answer this long first (default {POD_WINDOW_S:g})")
    args = parser.parse_args(argv)
    if not args.drain_file:
        parser.error(f"--drain-file or ${DRAIN_FILE_ENV} is required")
    endpoints = markable(Path(args.model_store), sorted(p.stem for p in Path(args.model_store).glob("*.mar")))
    started = time.monotonic()
    left = drain(args.url, endpoints, Path(args.drain_file), token=_token_from_env(), window_s=args.window_s)
    took = time.monotonic() - started
    if left:
        print(f"drain: no drain answer from {left} after {took:.1f} s", file=sys.stderr)
        return 1
    print(f"drain: {len(endpoints)} endpoints flushed in {took:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
