"""reports/reliability.{json,md}: hostile corpus, HTTP fuzz, load, faults, restarts, archive integrity and access,
run against a real TorchServe and a real Ray Serve on the same model store.

`torchship reliability` runs it all; tests/e2e/test_reliability.py runs the same functions with smaller counts.
"""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import torch

from torchship.archive.mar import MarArchive, rewrite_archive, store_archives, write_archive
from torchship.engines import engine_class
from torchship.engines.base import Engine
from torchship.engines.ray.launcher import RayServe
from torchship.engines.torchserve.launcher import TorchServe
from torchship.errors import EngineError, ReliabilityError, SignatureRefused
from torchship.handlers.codec import Signature, decode_response, encode_request
from torchship.handlers.errors import UnsafeArchive
from torchship.handlers.names import LOAD_REFUSED_MARKER, MANIFEST_FILE, REFERENCE_FILE, bearer
from torchship.reliability.corpus import Oracle, Target, auth_headers, load_corpus, run_corpus, run_fuzz, send
from torchship.reliability.grpc_corpus import run_grpc_corpus
from torchship.reliability.ops import OpsCounts, ops_markdown, ops_problems, plot_soak, run_operations
from torchship.reliability.rollout import ROLLOUT_MODEL, ray_rollouts, rollout_checks, rollout_markdown, summarize_rollouts
from torchship.reliability.traffic import FaultResult, make_pool, run_fault, run_load, summarize
from torchship.spec import Tolerance

#: The installed package: the unpickling scan reads its source (the handler, export, models and deploy included).
PACKAGE_ROOT = Path(str(resources.files("torchship")))
#: The models a reliability store archives (every usable format of each): fast enough for 2 cores, and covering
#: a classifier, a data-dependent router, a transformer decoder with integer outputs and a two-output function.
RELIABILITY_MODELS = ("dynamic_router", "simple_cnn", "seq_decoder", "process_outputs")
#: The body limit both engines enforce in these runs (small, so that a 413 is cheap to provoke).
LIMIT_BYTES = 4 * 1024 * 1024
FAULT_ENDPOINT = "dynamic_router"
ENGINE_NAMES = ("torchserve", "ray")
Say = Callable[[str], None]


# -- engines -------------------------------------------------------------------------------------------------------


def engine_for(name: str, model_store: Path, workdir: Path, **options: Any) -> Engine:
    """An engine on the store with the run's small body limit (a Ray one with a fresh token), not yet started."""
    if name == "ray":
        options.setdefault("token", secrets.token_hex(16))
    options.setdefault("ready_timeout_s", 400)
    return engine_class(name)(model_store, workdir, max_request_bytes=LIMIT_BYTES, **options)


def target_of(engine: Engine) -> Target:
    return Target(engine.name, engine.url, engine.token)


def first_pid(engine: Engine, endpoint: str) -> int | None:
    pids = engine.pids(endpoint)
    return pids[0] if pids else None


def oracle_for(model_store: Path) -> tuple[Oracle, dict[str, Signature]]:
    """Eager references for every archive of the store, and each endpoint's signature."""
    archived = store_archives(model_store)
    oracle = Oracle({a.endpoint: a.model for a in archived}, {a.endpoint: Tolerance(*a.tolerance) for a in archived})
    return oracle, {a.path.stem: Signature.from_manifest(a.manifest) for a in archived}


# -- restarts ------------------------------------------------------------------------------------------------------


def fixed_outputs(target: Target, oracle: Oracle, endpoints: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """One request at a time (no batching partner to change rounding): endpoint x batch (1, 3) x JSON/binary."""
    auth = auth_headers(target)
    out: dict[str, list[torch.Tensor]] = {}
    for endpoint in endpoints:
        for batch in (1, 3):
            inputs = oracle.inputs(endpoint, batch, seed=77)
            for binary in (False, True):
                body, headers = encode_request(inputs, binary=binary, parameters={"binary_data_output": binary})
                reply = send(target, "POST", f"/predictions/{endpoint}", body, {**headers, **auth})
                if reply.status != 200:
                    raise ReliabilityError(f"{target.engine} {endpoint}: HTTP {reply.status} {reply.body[:200]!r}")
                doc = decode_response(reply.body, reply.headers.get("inference-header-content-length"))
                out[f"{endpoint}/b{batch}/{'binary' if binary else 'json'}"] = list(doc["outputs"].values())
    return out


def differing(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> list[str]:
    """Keys whose tensors are not bit-identical (empty: identical)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not all(map(torch.equal, a[k], b[k])))


# -- archive integrity ---------------------------------------------------------------------------------------------


def write_entries(members: dict[str, bytes], out: Path) -> Path:
    """A .mar with exactly these entries: unlike archive.mar.write_archive, its checksum listing is not rewritten."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(members):
            z.writestr(name, members[name])
    return out


def tamper_byte(mar: Path, out: Path) -> Path:
    """The same archive with one byte of the serialized model changed (a valid zip: only the checksums can tell)."""
    archive = MarArchive(mar)
    members = dict(archive.entries)
    name = archive.manifest["formats"][archive.format]["file"]
    data = bytearray(members[name])
    data[len(data) // 2] ^= 0x01
    members[name] = bytes(data)
    return write_entries(members, out)


def tamper_manifest(mar: Path, out: Path) -> Path:
    """An archive whose manifest's sha256 for the model no longer matches the file, with the checksum listing
    rewritten to match the new manifest: the handler's own sha256 check must still refuse it."""
    archive = MarArchive(mar)
    manifest = archive.manifest
    manifest["formats"][archive.format]["sha256"] = "0" * 64

    def edit(members: dict[str, bytes]) -> None:
        members[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode("utf-8")

    return rewrite_archive(mar, out, edit)


TAMPERS: dict[str, Callable[[Path, Path], Path]] = {"changed byte": tamper_byte, "manifest sha256": tamper_manifest}


@dataclass(frozen=True)
class Refusal:
    engine: str
    tamper: str
    refused: bool
    message: str
    seconds: float


def refuses(engine: str, mar: Path, workdir: Path) -> Refusal:
    """Start an engine on a store holding only `mar`: it must not become ready, and the handler's refusal must show."""
    start = time.monotonic()
    try:
        with engine_for(engine, mar.parent, workdir, ready_timeout_s=300):
            return Refusal(engine, "", False, "became ready", round(time.monotonic() - start, 2))
    except EngineError as exc:
        message = str(exc)
        refused = LOAD_REFUSED_MARKER in message
        return Refusal(engine, "", refused, message[:400], round(time.monotonic() - start, 2))


def integrity_checks(good_mar: Path, workdir: Path, say: Say) -> list[Refusal]:
    refusals: list[Refusal] = []
    for tamper, make in TAMPERS.items():
        for engine in ENGINE_NAMES:
            folder = workdir / f"{engine}-{tamper.replace(' ', '-')}"
            bad = make(good_mar, folder / "store" / good_mar.name)
            say(f"integrity: {engine} on a .mar with a {tamper}")
            r = refuses(engine, bad, folder / "run")
            refusals.append(Refusal(engine, tamper, r.refused, r.message, r.seconds))
    return refusals


def signature_cases(good_mar: Path, folder: Path, signing_key: Path) -> dict[str, Path]:
    """Archives a server with a verify key must refuse, each alone in a store folder of its own, plus the control
    ("signed", which it must accept): unsigned, signed by another key, the listing rewritten after signing (signature
    kept), an entry changed after signing, and an entry added after signing."""
    from torchship.archive.signing import load_signing_key, sign_archive, write_key_pair

    def copy(case: str, members: dict[str, bytes] | None = None) -> Path:
        out = folder / case.replace(" ", "-") / good_mar.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if members is None:
            shutil.copyfile(good_mar, out)
            return out
        return write_entries(members, out)

    cases = {"signed": copy("signed")}
    sign_archive(cases["signed"], load_signing_key(signing_key))
    signed = dict(MarArchive(cases["signed"]).entries)
    cases["unsigned"] = copy("unsigned")
    cases["signed by another key"] = copy("another key")
    other, _ = write_key_pair(folder / "other-key")
    sign_archive(cases["signed by another key"], load_signing_key(other))
    swapped = {**signed, REFERENCE_FILE: b"swapped"}
    cases["listing rewritten after signing"] = copy("relisted")
    write_archive(swapped, cases["listing rewritten after signing"])  # a fresh listing; the old signature kept
    cases["entry changed after signing"] = copy("changed", swapped)
    cases["entry added after signing"] = copy("added", {**signed, "torchship_handler/sitecustomize.py": b"print('loaded')"})
    return cases


@dataclass(frozen=True)
class SignatureCheck:
    case: str
    #: torchserve / ray: their launcher (`torchship serve --verify-key`); ray-app: the app builder KubeRay runs.
    checker: str
    refused: bool
    message: str


def signature_checks(good_mar: Path, workdir: Path, say: Say) -> list[SignatureCheck]:
    """Each signature case against both engines' launchers and the Ray app's builder, with a verify key set. The
    refusals happen before any process starts; the signed control is checked to pass the same verification."""
    from torchship.archive.signing import load_verify_key, verify_store, write_key_pair
    from torchship.engines.ray.app import app as ray_app

    signing, verify = write_key_pair(workdir / "keys")
    checks: list[SignatureCheck] = []
    for case, mar in signature_cases(good_mar, workdir / "cases", signing).items():
        say(f"signatures: {case}")
        if case == "signed":
            verify_store(mar.parent, load_verify_key(verify))  # raises if the control were refused
            checks.append(SignatureCheck(case, "verify_store", False, "accepted"))
            continue
        for name in ENGINE_NAMES:
            engine = engine_for(name, mar.parent, workdir / "run" / f"{name}-{mar.parent.name}", verify_key=verify)
            try:
                engine.start()
            except EngineError as exc:
                checks.append(SignatureCheck(case, name, engine.process is None, str(exc)[:300]))
                continue
            engine.stop()
            checks.append(SignatureCheck(case, name, False, "started"))
        try:
            ray_app({"model_store": str(mar.parent), "verify_key_file": str(verify), "max_request_bytes": LIMIT_BYTES})
            checks.append(SignatureCheck(case, "ray-app", False, "built"))
        except SignatureRefused as exc:
            checks.append(SignatureCheck(case, "ray-app", True, str(exc)[:300]))
    return checks


def unpack_refuses_traversal(workdir: Path) -> dict[str, Any]:
    """The Ray app's unpacker on a .mar carrying `../` and absolute entries: refused, nothing written outside."""

    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for label, entry in (
        ("dotdot", "../escaped.txt"),
        ("deep dotdot", "torchship_handler/../../escaped.txt"),
        ("absolute", "/tmp/escaped.txt"),
    ):
        mar = workdir / f"evil-{label.replace(' ', '-')}.mar"
        with zipfile.ZipFile(mar, "w") as z:
            z.writestr(MANIFEST_FILE, "{}")
            z.writestr(entry, "written outside")
        cache = workdir / f"cache-{label.replace(' ', '-')}"
        try:
            MarArchive(mar).unpack_cached(cache)
            refused = False
        except UnsafeArchive:
            refused = True
        escaped = [
            p for p in (workdir / "escaped.txt", Path("/tmp/escaped.txt")) if p.exists() and p.read_text() == "written outside"
        ]
        results[label] = {"refused": refused, "written_outside": [str(p) for p in escaped]}
    return results


def python_files(root: Path) -> list[Path]:
    """Every .py file under root, following the folders the package links in (models, export, handlers, deploy)."""
    return sorted(Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files if f.endswith(".py"))


def unpickling_calls(roots: Sequence[Path]) -> list[str]:
    """Every `torch.load` without `weights_only=True`, and every pickle import, in the project's Python files."""
    found: list[str] = []
    for root in roots:
        for path in python_files(root):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                    base = node.func.value
                    if isinstance(base, ast.Name) and base.id == "torch":
                        safe = any(
                            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                            for k in node.keywords
                        )
                        if not safe:
                            found.append(f"{where}: torch.load without weights_only=True")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + (
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                    )
                    if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                        found.append(f"{where}: imports a pickle module")
    return found


PROJECT_CODE = (PACKAGE_ROOT,)


# -- access --------------------------------------------------------------------------------------------------------


def listening_addresses(pids: Sequence[int]) -> list[str]:
    """'ip:port' of every TCP socket in LISTEN state owned by these processes."""
    import psutil

    found: set[str] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            # psutil 6 renamed connections(); 5.9 (what torchserve pins) has only the old name, and a `ray` import can
            # put Ray's own newer psutil first, so the name in use depends on import order.
            connections = getattr(proc, "net_connections", None) or proc.connections
            for c in connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr:
                    found.add(f"{c.laddr.ip}:{c.laddr.port}")
    return sorted(found)


def is_loopback(address: str) -> bool:
    """'ip:port' on loopback, the IPv4-mapped form Java's listeners show (::ffff:127.0.0.1) included."""
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def process_tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def torchserve_access(server: TorchServe, model_store: Path, outside_dir: Path) -> dict[str, Any]:
    """Token on inference and management, listeners on loopback, and allowed_urls (management API enabled for it)."""
    inf, mgmt = server.token, server.management_key()
    ep = server.endpoints[0]
    body, headers = encode_request({"x": torch.zeros(1, 256)})

    def status(method: str, url: str, key: str | None, **kw: Any) -> int:
        h = bearer(key)
        return requests.request(method, url, headers={**h, **kw.pop("headers", {})}, timeout=30, **kw).status_code

    outside_dir.mkdir(parents=True, exist_ok=True)
    outside = outside_dir / "outside.mar"
    outside.write_bytes((model_store / f"{ep}.mar").read_bytes())
    register = f"{server.management_url}/models"
    result: dict[str, Any] = {
        "inference_without_token": status("POST", f"{server.url}/predictions/{ep}", None, data=body, headers=headers),
        "inference_with_management_key": status("POST", f"{server.url}/predictions/{ep}", mgmt, data=body, headers=headers),
        "inference_with_token": status("POST", f"{server.url}/predictions/{ep}", inf, data=body, headers=headers),
        "management_without_token": status("GET", f"{server.management_url}/models", None),
        "management_with_inference_key": status("GET", f"{server.management_url}/models", inf),
        "management_with_token": status("GET", f"{server.management_url}/models", mgmt),
        "metrics_without_token": status("GET", f"{server.metrics_url}/metrics", None),
        # Loopback only: a remote URL must be refused by allowed_urls before anything is fetched.
        "register_remote_url": status("POST", register, mgmt, params={"url": "http://127.0.0.1:9/model.mar"}),
        "register_outside_store": status("POST", register, mgmt, params={"url": f"file://{outside}"}),
        "register_path_traversal": status(
            "POST", register, mgmt, params={"url": f"file://{model_store}/../{outside_dir.name}/outside.mar"}
        ),
    }
    result["listening"] = listening_addresses(process_tree(server.pid))
    result["all_loopback"] = bool(result["listening"]) and all(map(is_loopback, result["listening"]))
    return result


def ray_access(engine: Engine) -> dict[str, Any]:
    import psutil

    port = engine.port
    listeners = sorted(
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    )
    body, headers = encode_request({"x": torch.zeros(1, 256)})
    url = f"{engine.url}/predictions/{FAULT_ENDPOINT}"
    return {
        "http_listeners": listeners,
        "http_loopback_only": bool(listeners) and all(map(is_loopback, listeners)),
        "inference_without_token": requests.post(url, data=body, headers=headers, timeout=30).status_code,
        "inference_with_token": requests.post(
            url, data=body, headers={**headers, **engine.auth_headers()}, timeout=30
        ).status_code,
    }


# -- the whole run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    load_requests: int
    concurrency: int
    fuzz_requests: int
    fault_requests: int


FULL = Counts(load_requests=5000, concurrency=16, fuzz_requests=500, fault_requests=1200)
QUICK = Counts(load_requests=300, concurrency=16, fuzz_requests=100, fault_requests=300)


def engine_checks(engine: Engine, model_store: Path, counts: Counts, say: Say) -> dict[str, Any]:
    """Corpus, fuzz, load and a fault on one running engine."""
    oracle, sigs = oracle_for(model_store)
    endpoints = sorted(sigs)
    name = engine.name
    target = target_of(engine)
    say(f"{name}: hostile corpus")
    corpus = run_corpus(target, load_corpus(), oracle, limit_bytes=LIMIT_BYTES)
    say(f"{name}: HTTP fuzz, {counts.fuzz_requests} requests")
    fuzz = run_fuzz(target, oracle, sigs[FAULT_ENDPOINT], requests=counts.fuzz_requests, seed=11)
    pool = make_pool(oracle, endpoints)
    say(f"{name}: load, {counts.load_requests} requests at {counts.concurrency} concurrent clients")
    shots = run_load(target, pool, requests_total=counts.load_requests, concurrency=counts.concurrency)
    load = summarize(name, shots, counts.concurrency)
    say(
        f"{name}: load {load.ok}/{load.requests} ok, p99 {load.latency_p99_ms} ms; now killing {FAULT_ENDPOINT}'s process mid-run"
    )
    fault = run_fault(
        target, pool, endpoint=FAULT_ENDPOINT,
        what="TorchServe worker process" if name == "torchserve" else "Ray Serve replica actor",
        find_pid=lambda: first_pid(engine, FAULT_ENDPOINT), requests_total=counts.fault_requests,
        concurrency=counts.concurrency, kill_after=counts.fault_requests // 4,
    )  # fmt: skip
    return {
        "corpus": [asdict(r) | {"passed": r.passed} for r in corpus],
        "fuzz": asdict(fuzz),
        "load": load.as_dict(),
        "fault": fault.as_dict(),
        "before_restart": fixed_outputs(target, oracle, endpoints),
    }


def summary_row(engine: str, doc: dict[str, Any]) -> dict[str, Any]:
    corpus, fuzz, load, fault = doc["corpus"], doc["fuzz"], doc["load"], doc["fault"]
    statuses = [r["status"] for r in corpus] + [int(s) for s in fuzz["by_status"] for _ in range(fuzz["by_status"][s])]
    return {
        "engine": engine,
        "corpus_cases": len(corpus),
        "corpus_passed": sum(r["passed"] for r in corpus),
        "fuzz_requests": fuzz["requests"],
        "cases_tried": len(corpus) + fuzz["requests"],
        "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
        "no_answer": sum(r["status"] == 0 for r in corpus) + len(fuzz["no_answer"]),
        "load_requests": load["requests"],
        "load_errors": load["errors"] + load["lost"],
        "load_wrong_answers": load["wrong_answers"],
        "latency_p99_ms": load["latency_p99_ms"],
        "requests_per_s": load["requests_per_s"],
        "faults_injected": 1,
        "recovered": int(FaultResult(**{k: v for k, v in fault.items() if k != "recovered"}).recovered),
        "recovery_s": fault["recovery_s"],
        "fault_requests": fault["requests"],
        "fault_failed": fault["failed"],
        "fault_failed_sent_after_kill": fault["failed_sent_after_kill"],
        "fault_failed_not_in_flight": fault["failed_not_in_flight"],
        "fault_wrong_answers": fault["wrong_answers"],
        "requests_lost": load["lost"] + fault["lost"],
        "restart_identical": doc["restart_identical"],
    }


def run_reliability(
    model_store: Path, workdir: Path, counts: Counts, say: Say, ops_counts: OpsCounts | None = None
) -> dict[str, Any]:
    """Everything, on both engines, one after the other (2 cores: never both at once); with `ops_counts`, also the
    operations checks (slow and flooding clients, soak, drain) on `torchship serve` of each engine."""
    engines: dict[str, dict[str, Any]] = {}
    access: dict[str, Any] = {}
    for name in reversed(ENGINE_NAMES):  # Ray first: a stopped run (tests/e2e/test_stop.py) reaches it soonest
        say(f"starting {name} on {model_store}")
        options = {"grpc_port": 0} if name == "ray" else {}  # the Ray app's OIP gRPC, on a free port
        with engine_for(name, model_store, workdir / name, **options) as engine:
            doc = engine_checks(engine, model_store, counts, say)
            access[name] = ray_access(engine) if name == "ray" else None
            if isinstance(engine, RayServe) and engine.grpc_address:
                say("ray: hostile gRPC cases (OIP GRPCInferenceService)")
                cases = run_grpc_corpus(engine.grpc_address, engine.token, limit_bytes=LIMIT_BYTES)
                doc["grpc_corpus"] = [asdict(c) | {"passed": c.passed} for c in cases]
        say(f"{name}: restarting on the same model store")
        with engine_for(name, model_store, workdir / f"{name}-restart") as engine:
            oracle, sigs = oracle_for(model_store)
            after = fixed_outputs(target_of(engine), oracle, sorted(sigs))
        before = doc.pop("before_restart")
        doc["restart_differs"] = differing(before, after)
        doc["restart_identical"] = not doc["restart_differs"]
        doc["restart_outputs_compared"] = len(before)
        engines[name] = doc
    say("torchserve: access (tokens, loopback, allowed_urls with the management API on)")
    with engine_for("torchserve", model_store, workdir / "access", overrides={"enable_model_api": "true"}) as server:
        assert isinstance(server, TorchServe)
        access["torchserve"] = torchserve_access(server, model_store, workdir / "outside")
        tolerance = oracle_for(model_store)[0].tolerances[ROLLOUT_MODEL]
        rollouts = rollout_checks(server, workdir / "rollout", tolerance, say)
    rollouts += ray_rollouts(model_store, workdir / "ray-rollout", tolerance, say)
    integrity = [asdict(r) for r in integrity_checks(model_store / f"{FAULT_ENDPOINT}.mar", workdir / "integrity", say)]
    signatures = [asdict(c) for c in signature_checks(model_store / f"{FAULT_ENDPOINT}.mar", workdir / "signatures", say)]
    operations: dict[str, Any] = {}
    if ops_counts is not None:
        oracle, sigs = oracle_for(model_store)
        for name in ENGINE_NAMES:
            operations[name], _ = run_operations(
                name, model_store, workdir / f"{name}-ops", oracle=oracle, endpoints=sorted(sigs), counts=ops_counts, say=say
            )
    traversal = unpack_refuses_traversal(workdir / "traversal")
    pickles = unpickling_calls(PROJECT_CODE)
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
        "counts": asdict(counts),
        "limit_bytes": LIMIT_BYTES,
        "summary": [summary_row(n, engines[n]) for n in ENGINE_NAMES],
        "engines": {n: engines[n] for n in ENGINE_NAMES},
        "integrity": integrity,
        "signatures": signatures,
        "traversal": traversal,
        "unpickling_calls": pickles,
        "access": access,
        "operations": operations,
        "rollouts": rollouts,
    }


def problems(report: dict[str, Any]) -> list[str]:
    """What failed, as sentences; empty when every check held."""
    problems: list[str] = []
    statuses: dict[str, dict[str, int]] = {}
    for row in report["summary"]:
        e = row["engine"]
        if row["corpus_passed"] != row["corpus_cases"]:
            problems.append(f"{e}: {row['corpus_cases'] - row['corpus_passed']} corpus cases failed")
        for key in ("5xx", "no_answer", "load_errors", "load_wrong_answers", "fault_wrong_answers", "fault_failed_not_in_flight"):
            if row[key]:
                problems.append(f"{e}: {key} = {row[key]}")
        if not row["recovered"]:
            problems.append(f"{e}: the killed process was not replaced")
        if not row["restart_identical"]:
            problems.append(f"{e}: outputs changed across a restart")
    for name, doc in report["engines"].items():
        statuses[name] = {r["case"]: r["status"] for r in doc["corpus"]}
        if doc["fuzz"]["wrong_answers"] or not doc["fuzz"]["healthy_after"]:
            problems.append(f"{name}: fuzz wrong answers or unhealthy after")
    if len(statuses) == 2:
        a, b = statuses.values()
        differ = sorted(k for k in a if a.get(k) != b.get(k))
        if differ:
            problems.append(f"the engines answered {differ} with different statuses")
    problems += [f"{r['engine']}: {r['tamper']} archive was not refused" for r in report["integrity"] if not r["refused"]]
    for c in report["signatures"]:
        if c["refused"] != (c["case"] != "signed"):
            problems.append(f"signatures: {c['checker']} {'refused' if c['refused'] else 'accepted'} the {c['case']} archive")
    problems += [f"unpack: {k} not refused" for k, v in report["traversal"].items() if not v["refused"] or v["written_outside"]]
    problems += report["unpickling_calls"]
    ts = report["access"].get("torchserve") or {}
    if ts:
        refused = (
            "inference_without_token", "inference_with_management_key", "management_without_token",
            "management_with_inference_key", "register_remote_url", "register_outside_store", "register_path_traversal",
        )  # fmt: skip
        problems += [f"torchserve: {k} answered {ts[k]}" for k in refused if not 400 <= ts[k] < 500]
        problems += [
            f"torchserve: {k} answered {ts[k]}" for k in ("inference_with_token", "management_with_token") if ts[k] != 200
        ]
        if not ts["all_loopback"]:
            problems.append(f"torchserve listens beyond loopback: {ts['listening']}")
    for name, doc in report["engines"].items():
        problems += [
            f"{name}: gRPC case {c['case']} answered {c['code']} (expected {c['expected']}; healthy after: {c['healthy_after']})"
            for c in doc.get("grpc_corpus") or []
            if not c["passed"]
        ]
    for name, doc in (report.get("operations") or {}).items():
        problems += ops_problems(name, doc)
    problems += summarize_rollouts(report.get("rollouts") or [])
    ray = report["access"].get("ray") or {}
    if ray and (not ray["http_loopback_only"] or ray["inference_with_token"] != 200 or ray["inference_without_token"] < 400):
        problems.append(f"ray access: {ray}")
    return problems


def markdown(report: dict[str, Any]) -> str:
    cols = [
        ("engine", "engine"), ("cases tried", "cases_tried"), ("4xx", "4xx"), ("5xx", "5xx"),
        ("requests under load", "load_requests"), ("errors", "load_errors"), ("wrong answers", "load_wrong_answers"),
        ("p99 ms", "latency_p99_ms"), ("faults injected", "faults_injected"), ("recovered", "recovered"),
        ("recovery s", "recovery_s"), ("failed in fault run", "fault_failed"), ("requests lost", "requests_lost"),
        ("restart identical", "restart_identical"),
    ]  # fmt: skip
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[k]) for _, k in cols) + " |" for row in report["summary"]]
    refusals = ", ".join(f"{r['engine']} / {r['tamper']}: {'refused' if r['refused'] else 'LOADED'}" for r in report["integrity"])
    signed = [c for c in report["signatures"] if c["case"] != "signed"]
    verdict = f"{sum(c['refused'] for c in signed)} of {len(signed)} refused before loading"
    cases = sorted({c["case"] for c in signed})
    lines += ["", f"Tampered archives: {refusals}.",
              f"Signed archives, verify key set ({', '.join(cases)}; by the TorchServe and Ray launchers and the Ray app's "
              f"builder): {verdict}; the signed control "
              f"{'accepted' if all(not c['refused'] for c in report['signatures'] if c['case'] == 'signed') else 'REFUSED'}.",
              f"Unpickling calls in the project: {len(report['unpickling_calls'])}."]  # fmt: skip
    grpc = [c for doc in report["engines"].values() for c in doc.get("grpc_corpus") or []]
    if grpc:
        lines.append(f"Hostile gRPC cases (the Ray app's OIP gRPC): {sum(c['passed'] for c in grpc)} of {len(grpc)} got "
                     "their status code and left the server healthy.")  # fmt: skip
    if report.get("operations"):
        lines += ["", ops_markdown(report["operations"])]
    if report.get("rollouts"):
        lines += ["", rollout_markdown(report["rollouts"])]
    return "\n".join(lines) + "\n"


def write_reliability_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "reliability.json", out_dir / "reliability.md"
    js.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md.write_text(markdown(report), encoding="utf-8")
    if report.get("operations"):
        plot_soak([doc["soak"] for doc in report["operations"].values()], out_dir / "soak.png")
    return js, md


def build_store(artifacts: Path, out: Path, *, defaults_only: bool = False) -> Path:
    """Archive RELIABILITY_MODELS from an export folder into a store of their own: each model's default endpoint
    and its other TorchScript and .pt2 endpoints (`defaults_only`: the four default endpoints alone instead of seven,
    which is what make test's smaller run serves: every engine start loads fewer workers or replicas)."""
    from torchship.archive.build import archive_models, load_model_config

    archive_models(list(RELIABILITY_MODELS), artifacts=artifacts, out_dir=out, model_config=load_model_config())
    # AOTInductor only where it is a model's default endpoint (the corpus and the fault run address models by that
    # name): the packages are tied to the CPU they were built on and, being unchecked by the engine, are not what
    # this run is about (the handler validates shapes before any format runs).
    for mar in out.glob("*.mar"):
        archive = MarArchive(mar)
        if archive.endpoint != archive.model and (defaults_only or archive.format == "aoti"):
            mar.unlink()
    return out


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="torchship-reliability-"))
