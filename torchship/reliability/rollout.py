"""A model version rollout under load on TorchServe, the way a user does it through the management API: register
version 2 beside version 1, gate it (its answers at /predictions/<m>/2.0 equal to its own eager model), make it the
default, unregister version 1. 16 clients send checked requests to /predictions/<m> throughout; every answer must
equal the eager output of exactly one version, the one its X-Torchship-Model-Version header names, and once the
switch is done only version 2 answers. A version that fails its gate is unregistered and never becomes the default.

Version 2 is what a retrain makes: the same model and signature, other weights (built from code and a seed).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import torch

from torchship.handlers.codec import encode_request
from torchship.handlers.names import VERSION_HEADER, bearer
from torchship.reliability.corpus import Oracle, Target, auth_headers
from torchship.reliability.traffic import FAILED
from torchship.spec import ModelSpec, Tolerance
from torchship.verify import load
from torchship.verify.load import HttpReply, LoadRequest

ROLLOUT_MODEL = "dynamic_router"
NEW_VERSION = "2.0"
#: How long the clients keep sending after the switch is complete (only version 2 may answer then).
AFTER_SWITCH_S = 1.5
GATE_REQUESTS = 8
#: How long a Ray rollout (candidate deploy, gate, redeploy) may take.
RAY_ROLLOUT_TIMEOUT_S = 300.0


def retrained(spec: ModelSpec, version: str, seed: int) -> ModelSpec:
    """Another version of `spec`: its weights moved by seeded noise (1% of each tensor's scale), as a retrain would."""
    base = spec.factory

    def factory() -> torch.nn.Module:
        model = base()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (p.abs().mean() * 0.1 + 1e-3))
        return model.eval()

    return dataclasses.replace(spec, version=version, factory=factory)


def build_version(spec: ModelSpec, workdir: Path) -> Path:
    """Export `spec` (TorchScript, its parity gate included) and archive it; return the .mar."""
    from torchship.archive.build import archive_models, load_model_config
    from torchship.export.exporter import export_model

    artifacts = workdir / "artifacts"
    # TorchScript only: the rolled-out endpoint is the model's default one, and the version is what is under test.
    export_model(dataclasses.replace(spec, formats=("torchscript",)), out_dir=artifacts, default_format="torchscript")
    built = archive_models([spec.name], artifacts=artifacts, out_dir=workdir / "store", model_config=load_model_config())
    return next(e.mar for e in built if e.name == spec.name)


@dataclass
class RolloutResult:
    engine: str
    endpoint: str
    #: "switched" (gate passed, v2 the default, v1 unregistered) or "refused" (gate failed, v1 kept)
    outcome: str
    gate_passed: bool
    requests: int
    failed: int
    wrong_answers: int
    #: answers whose outputs matched one version but whose header named the other
    header_mismatch: int
    answered_by: dict[str, int]
    #: answers sent after the switch completed (or, for a refused version, after it was unregistered) by the old one
    old_after_switch: int
    switch_s: float
    failures: list[str]

    @property
    def passed(self) -> bool:
        expected = self.gate_passed == (self.outcome == "switched")
        clean = not (self.failed or self.wrong_answers or self.header_mismatch or self.old_after_switch)
        return expected and clean

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


class _Versions:
    """Which version's eager output a reply equals (or '' for none)."""

    def __init__(self, endpoint: str, tolerance: Tolerance, specs: dict[str, ModelSpec]) -> None:
        self.endpoint = endpoint
        self.oracles = {v: Oracle({endpoint: s.name}, {endpoint: tolerance}, specs={s.name: s}) for v, s in specs.items()}

    def inputs(self, batch: int, seed: int) -> dict[str, torch.Tensor]:
        return next(iter(self.oracles.values())).inputs(self.endpoint, batch, seed)

    def which(self, inputs: dict[str, torch.Tensor], reply: HttpReply) -> str:
        matched = [v for v, o in self.oracles.items() if not o.check(self.endpoint, inputs, reply)]
        return matched[0] if len(matched) == 1 else ""


def _management(url: str, key: str | None, method: str, path: str) -> requests.Response:
    return requests.request(method, f"{url.rstrip('/')}{path}", headers=bearer(key), timeout=120)


def run_under_load(
    target: Target, endpoint: str, oracle: _Versions, switch: Callable[[], bool], *, clients: int = 16
) -> RolloutResult:
    """`clients` send checked requests to /predictions/<endpoint> while `switch()` runs the engine's rollout steps
    (it returns whether the new version passed its gate, i.e. whether it was switched to)."""

    def answered_by(inputs: dict[str, torch.Tensor]) -> load.Check:
        """Tags each 200 with the version whose eager outputs it equals; a wrong answer, or a version header that
        names another version, is a problem."""

        def check(reply: HttpReply) -> tuple[str, str]:
            version = oracle.which(inputs, reply)
            named = reply.headers.get(VERSION_HEADER.lower(), "")
            return ("wrong answer" if not version else ("header names " + named if named != version else "")), version

        return check

    pool = []
    for batch in (1, 2):
        for seed in range(4):
            inputs = oracle.inputs(batch, seed)
            body, headers = encode_request(inputs)
            pool.append(LoadRequest(endpoint, body, headers, answered_by(inputs), batch=batch))
    run = load.start_load(
        target.url, pool, clients=clients, auth=auth_headers(target), stop=threading.Event(),
        pick=load.cycle(len(pool), step=clients),
    )  # fmt: skip
    try:
        time.sleep(1.0)
        started = time.monotonic()
        gate_passed = switch()
        switched_at = time.monotonic()
        time.sleep(AFTER_SWITCH_S)
    finally:
        run.stop()
    shots = run.join(70)
    expected_after = NEW_VERSION if gate_passed else "1.0"
    answered: dict[str, int] = {}
    for s in shots:
        if s.outcome == "ok":
            answered[s.tag] = answered.get(s.tag, 0) + 1
    return RolloutResult(
        engine=target.engine,
        endpoint=endpoint,
        outcome="switched" if gate_passed else "refused",
        gate_passed=gate_passed,
        requests=len(shots),
        failed=sum(s.outcome in FAILED for s in shots),
        wrong_answers=sum(s.outcome == "wrong" and s.detail == "wrong answer" for s in shots),
        header_mismatch=sum(s.outcome == "wrong" and s.detail.startswith("header") for s in shots),
        answered_by=dict(sorted(answered.items())),
        old_after_switch=sum(1 for s in shots if s.start_s > switched_at and s.tag and s.tag != expected_after),
        switch_s=round(switched_at - started, 2),
        failures=[f"{s.outcome}: {s.detail}" for s in shots if s.outcome != "ok"][:10],
    )


def run_rollout(
    server: Any,
    candidate_mar: Path,
    *,
    endpoint: str,
    tolerance: Tolerance,
    versions: dict[str, ModelSpec],
    clients: int = 16,
) -> RolloutResult:
    """Roll `candidate_mar` (version NEW_VERSION) onto a running TorchServe (engines.torchserve.launcher.TorchServe with
    the model API on) under `clients` checked clients. `versions` maps each version to the spec whose eager outputs it
    must give: a candidate whose archive does not match versions[NEW_VERSION] fails its gate."""
    target = Target(server.name, server.url, server.token)
    key = server.management_key()
    oracle = _Versions(endpoint, tolerance, versions)
    # The archive goes into the store TorchServe may register from (allowed_urls); the user's step 0.
    staged = server.model_store / f"{endpoint}-v{NEW_VERSION}.mar"

    def switch() -> bool:
        url = f"/models?url={staged.name}&initial_workers=1&synchronous=true"
        reg = _management(server.management_url, key, "POST", url)
        if reg.status_code != 200:
            raise RuntimeError(f"registering {staged.name} failed: HTTP {reg.status_code} {reg.text[:200]}")
        if not _gate(target, endpoint, NEW_VERSION, oracle):
            _management(server.management_url, key, "DELETE", f"/models/{endpoint}/{NEW_VERSION}")
            return False
        _switch(server, key, target, endpoint, oracle)
        return True

    shutil.copyfile(candidate_mar, staged)
    try:
        return run_under_load(target, endpoint, oracle, switch, clients=clients)
    finally:
        staged.unlink(missing_ok=True)


def run_ray_rollout(
    server: Any,
    candidate_mar: Path,
    *,
    endpoint: str,
    tolerance: Tolerance,
    versions: dict[str, ModelSpec],
    clients: int = 16,
) -> RolloutResult:
    """Roll `candidate_mar` onto a running `torchship serve ray` (reliability.ops.CliServer) the way a user does:
    replace the endpoint's archive in the store, send SIGHUP; the app deploys the store as a candidate, gates it and
    redeploys only if it passed (engines.ray.rollout_app). The outcome is read from the engine's log."""
    import signal

    target = server.target()
    oracle = _Versions(endpoint, tolerance, versions)
    store = Path(server.model_store)
    live = store / f"{endpoint}.mar"
    kept = store.parent / f"{endpoint}.mar.previous"
    log = server.workdir / "ray.log"

    def switch() -> bool:
        seen = log.read_text(encoding="utf-8", errors="replace").count("rollout: ")
        shutil.copyfile(live, kept)
        staging = store / f".{endpoint}.mar.new"
        shutil.copyfile(candidate_mar, staging)
        staging.replace(live)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RAY_ROLLOUT_TIMEOUT_S
        while time.monotonic() < deadline:
            lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if "rollout: " in ln]
            if len(lines) > seen:
                switched: bool = lines[-1].split("rollout: ", 1)[1].startswith("switched")
                if not switched:
                    kept.replace(live)  # the user puts the serving version back
                return switched
            time.sleep(0.5)
        raise RuntimeError(f"no rollout outcome in {log} after {RAY_ROLLOUT_TIMEOUT_S:.0f} s")

    return run_under_load(target, endpoint, oracle, switch, clients=clients)


def _switch(server: Any, key: str | None, target: Target, endpoint: str, oracle: _Versions) -> None:
    """Make the new version the default, let version 1 answer what it already queued, then unregister it (TorchServe
    drops a version's queued requests unanswered when it is unregistered). A request addressed to version 1 queues
    behind all of them: its answer means the queue is empty (exact with one worker, the default)."""
    r = _management(server.management_url, key, "PUT", f"/models/{endpoint}/{NEW_VERSION}/set-default")
    if r.status_code != 200:
        raise RuntimeError(f"set-default failed: HTTP {r.status_code} {r.text[:200]}")
    body, headers = encode_request(oracle.inputs(1, 0))
    requests.post(f"{target.url}/predictions/{endpoint}/1.0", data=body, headers={**headers, **auth_headers(target)}, timeout=60)
    r = _management(server.management_url, key, "DELETE", f"/models/{endpoint}/1.0")
    if r.status_code != 200:
        raise RuntimeError(f"unregistering version 1.0 failed: HTTP {r.status_code} {r.text[:200]}")


def _gate(target: Target, endpoint: str, version: str, oracle: _Versions) -> bool:
    """The parity gate: the candidate, addressed by its version, answers eager's outputs for every gate input."""
    checker = oracle.oracles[version]
    pool = []
    for seed in range(GATE_REQUESTS):
        inputs = oracle.inputs(1 + seed % 3, 1000 + seed)
        body, headers = encode_request(inputs)
        check = load.expect_outputs(checker.output_names(endpoint), checker.eager(endpoint, inputs), checker.tolerances[endpoint])
        pool.append(LoadRequest(endpoint, body, headers, check, path=f"/predictions/{endpoint}/{version}"))
    shots = load.run_load(target.url, pool, clients=1, auth=auth_headers(target), requests_total=len(pool))
    unanswered = [s for s in shots if s.outcome in ("refused", "hung")]
    if unanswered:
        raise RuntimeError(f"the gate got no answer from version {version}: {unanswered[0].detail}")
    return len(shots) == len(pool) and all(s.outcome == "ok" for s in shots)


def rollout_specs(base: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
    """(the version that is rolled out, a different model claiming the same version: the one whose gate must fail)."""
    return retrained(base, NEW_VERSION, seed=2), retrained(base, NEW_VERSION, seed=3)


def mismatched_archive(model_mar: Path, references_mar: Path, out: Path) -> Path:
    """`model_mar` carrying `references_mar`'s recorded eager outputs, its checksum listing made to match: a valid
    archive whose model does not reproduce its references (a build that mixed up two trainings). Its gate must fail."""
    import json

    from torchship.archive.mar import MarArchive, rewrite_archive
    from torchship.handlers.names import MANIFEST_FILE, REFERENCE_FILE

    model, refs = MarArchive(model_mar), MarArchive(references_mar)
    manifest = model.manifest
    manifest["reference"] = refs.manifest["reference"]

    def edit(members: dict[str, bytes]) -> None:
        members[REFERENCE_FILE] = refs.entries[REFERENCE_FILE]
        members[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode("utf-8")

    return rewrite_archive(model_mar, out, edit)


def ray_rollout_checks(server: Any, workdir: Path, tolerance: Tolerance, say: Any) -> list[dict[str, Any]]:
    """Both rollouts on one running `torchship serve ray` whose store holds ROLLOUT_MODEL's default endpoint: an
    archive that does not reproduce its references (refused at the gate), then a good one (switched)."""
    from torchship.models import ZOO

    base = ZOO[ROLLOUT_MODEL]
    good, impostor = rollout_specs(base)
    say(f"ray: building version {NEW_VERSION} of {ROLLOUT_MODEL} and a mismatched build of it (export + archive)")
    mar = build_version(good, workdir / "v2")
    bad = mismatched_archive(mar, build_version(impostor, workdir / "impostor"), workdir / "mismatched" / mar.name)
    results: list[dict[str, Any]] = []
    versions = {"1.0": base, NEW_VERSION: good}
    for label, candidate in (("a version that fails its gate", bad), ("a version that passes its gate", mar)):
        say(f"ray: rollout under 16 clients (store replaced, SIGHUP): {label}")
        r = run_ray_rollout(server, candidate, endpoint=ROLLOUT_MODEL, tolerance=tolerance, versions=versions)
        results.append(r.as_dict() | {"case": label})
    return results


def ray_rollouts(model_store: Path, workdir: Path, tolerance: Tolerance, say: Any) -> list[dict[str, Any]]:
    """ray_rollout_checks on a `torchship serve ray` of its own, over a copy of ROLLOUT_MODEL's archive (a rollout
    replaces the file in the store it serves)."""
    from torchship.reliability.ops import start_cli_server

    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_store / f"{ROLLOUT_MODEL}.mar", store / f"{ROLLOUT_MODEL}.mar")
    say("ray: starting `torchship serve ray` for the version rollouts")
    server = start_cli_server("ray", store, workdir / "server")
    try:
        return ray_rollout_checks(server, workdir, tolerance, say)
    finally:
        server.kill()


def rollout_checks(server: Any, workdir: Path, tolerance: Tolerance, say: Any) -> list[dict[str, Any]]:
    """Both rollouts on one running TorchServe: a version that fails its gate (refused, v1 keeps serving), then a
    good one (switched)."""
    from torchship.models import ZOO

    base = ZOO[ROLLOUT_MODEL]
    good, impostor = rollout_specs(base)
    say(f"{server.name}: building version {NEW_VERSION} of {ROLLOUT_MODEL} (export + archive)")
    mar = build_version(good, workdir / "v2")
    results: list[dict[str, Any]] = []
    for label, claimed in (("a version that fails its gate", impostor), ("a version that passes its gate", good)):
        say(f"{server.name}: rollout under 16 clients: {label}")
        r = run_rollout(server, mar, endpoint=ROLLOUT_MODEL, tolerance=tolerance, versions={"1.0": base, NEW_VERSION: claimed})
        results.append(r.as_dict() | {"case": label})
    return results


def summarize_rollouts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What failed, as sentences."""
    return [
        f"rollout ({r['case']}): outcome {r['outcome']}, failed {r['failed']}, wrong {r['wrong_answers']}, "
        f"header mismatches {r['header_mismatch']}, old version after the switch {r['old_after_switch']}"
        for r in rows
        if not r["passed"]
    ]


def rollout_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"Version rollout under 16 clients (TorchServe: management API, register {NEW_VERSION}, gate, set-default, "
        "unregister 1.0; Ray: archive replaced in the store, SIGHUP, candidate app gated, redeploy):",
        "",
        "| engine | case | outcome | requests | failed | wrong | answered by | old version after the switch | switch s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        by = ", ".join(f"{v}: {n}" for v, n in r["answered_by"].items())
        lines.append(
            f"| {r['engine']} | {r['case']} | {r['outcome']} | {r['requests']} | {r['failed']} | {r['wrong_answers']} | {by} | "
            f"{r['old_after_switch']} | {r['switch_s']} |"
        )
    return "\n".join(lines)
