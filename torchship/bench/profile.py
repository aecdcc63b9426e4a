"""Where the served path's CPU goes, by process and function: py-spy samples every Python process of a running
engine while sequential batch-1 requests are sent, and the samples are summed per process and per leaf function.

What it covers: the Python side of each engine (TorchServe's worker; Ray's HTTP proxy, ingress and endpoint
replicas, controller and raylet-side Python). TorchServe's Java front end is not Python and is not sampled; the
breakdown's front-end counters account for it. Idle threads are not sampled, so a share is of on-CPU time.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from torchship.bench.served import Payload, measure_load
from torchship.engines.base import Engine
from torchship.spec import Tolerance

#: Samples per second per process (py-spy's default is 100; more resolves sub-millisecond frames better).
RATE_HZ = 250
#: Seconds py-spy is given to attach before the traffic starts; it records that long and a second more than the
#: traffic, so the whole run is sampled (the idle moments around it add no samples: idle threads are not sampled).
ATTACH_S = 1.0
#: Leaf functions kept per process in the report.
TOP_FUNCTIONS = 6
_PROCESS_FRAME = re.compile(r'^process (\d+):"(.*)"$')


def py_spy() -> str | None:
    """The py-spy of this environment (it comes with Ray), or None."""
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def role(cmdline: str) -> str:
    """A readable name for a sampled process, from its command line (Ray names its actors in the process title)."""
    for marker, name in (
        ("ProxyActor", "ray: HTTP proxy"), ("ServeController", "ray: Serve controller"),
        ("ServeReplica:torchship:ingress", "ray: ingress replica"), ("ServeReplica:", "ray: endpoint replica"),
        ("model_service_worker", "torchserve: worker"), ("raylet", "ray: raylet"), ("dashboard", "ray: dashboard"),
        ("torchship.engines.ray.launcher", "ray: launcher"), ("gcs_server", "ray: GCS"),
        ("bin/torchserve", "torchserve: launcher"),
    ):  # fmt: skip
        if marker in cmdline:
            return name
    return cmdline.split(" ", 1)[0][-40:] or "python"


def command_line(pid: int) -> str:
    """A live process's command line as it shows it (Ray replicas retitle themselves `ray::ServeReplica:...`)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def summarize(collapsed: str, seconds: float) -> list[dict[str, Any]]:
    """py-spy's raw (collapsed-stack) output, with --subprocesses, into one row per process: on-CPU share of one core
    over the run and the functions most often on top of the stack. Call it while the processes still run: each is
    named from its live command line (py-spy records only the interpreter's path)."""
    per_process: dict[str, Counter[str]] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # With --subprocesses a stack starts with the chain of processes down to the sampled one: the last names it.
        matches = [m for m in map(_PROCESS_FRAME.match, frames) if m]
        match = matches[-1] if matches else None
        if len(matches) == len(frames):
            continue
        name = role(command_line(int(match.group(1))) or match.group(2)) if match else "python"
        leaf = re.sub(r" \(.*?/([^/]+:\d+)\)$", r" (\1)", frames[-1])
        per_process.setdefault(name, Counter())[leaf] += int(count)
    rows = []
    for name, leaves in per_process.items():
        total = sum(leaves.values())
        rows.append({
            "process": name,
            "samples": total,
            "cpu_share": total / (RATE_HZ * seconds) if seconds else 0.0,
            "top": [{"function": f, "share": n / total} for f, n in leaves.most_common(TOP_FUNCTIONS)],
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["samples"])


def profile(
    running: Engine, url: str, payloads: list[Payload], tol: Tolerance, *, seconds: float
) -> dict[str, Any]:  # fmt: skip
    """Sample the engine's whole process tree with py-spy while one client sends sequential requests to `url`."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy is not installed"}
    with tempfile.TemporaryDirectory(prefix="torchship-pyspy-") as tmp:
        out = Path(tmp) / "stacks.txt"
        cmd = [exe, "record", "--pid", str(running.pid), "--subprocesses", "--format", "raw", "--rate", str(RATE_HZ),
               "--duration", str(math.ceil(seconds + ATTACH_S + 1)), "--nonblocking", "--output", str(out)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(ATTACH_S)  # py-spy attaches to every process of the tree before the traffic starts
        load = measure_load(url, running.token, payloads, tol, clients=1, duration_s=seconds).summary()
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"py-spy exited {proc.returncode}: {err.strip()[-300:]}"}
        rows = summarize(out.read_text(encoding="utf-8", errors="replace"), seconds)
    return {"seconds": seconds, "rate_hz": RATE_HZ, "requests": load["requests"], "p50_ms": load["p50_ms"],
            "wrong": load["wrong"], "errors": load["errors"], "processes": rows}  # fmt: skip
