"""Reliability on a real TorchServe and a real Ray Serve: the hostile corpus, HTTP fuzz, load with every answer
checked against eager, a killed worker and replica, restarts, tampered archives and access. The same functions
as `torchship reliability` (`make reliability`), with smaller counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchship.engines.base import Engine
from torchship.engines.ray.app import BODY_TIMEOUT_ENV
from torchship.engines.ray.launcher import replica_pids
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.codec import Signature
from torchship.reliability import run as rel
from torchship.reliability.corpus import Oracle, healthy, load_corpus, run_corpus, run_fuzz
from torchship.reliability.ops import SOAK_GROWTH_LIMIT, engine_stoppable, run_drain, run_slow_clients, run_soak
from torchship.reliability.rollout import NEW_VERSION, ROLLOUT_MODEL, rollout_checks
from torchship.reliability.traffic import make_pool, run_fault, run_load, summarize

LOAD_REQUESTS = 250
SOAK_REQUESTS = 250
SLOW_REQUESTS = 80
BODY_TIMEOUT_S = 1.5
FUZZ_REQUESTS = 120
FAULT_REQUESTS = 300
CONCURRENCY = 16


@pytest.fixture(scope="module")
def store(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The default endpoints only (make reliability serves their .pt2 and TorchScript siblings too; every format is
    # served and verified on both engines by test_torchserve.py and test_ray.py).
    return rel.build_store(artifacts_dir, tmp_path_factory.mktemp("reliability_store"), defaults_only=True)


@pytest.fixture(scope="module")
def oracle(store: Path) -> tuple[Oracle, dict[str, Signature]]:
    return rel.oracle_for(store)


@pytest.fixture(scope="module")
def engines(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """Both engines on the same store, for the whole module (the drain and restart tests at the end stop them). The
    Ray app's body timeout is short here, so the slow-client test sees it cut."""
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        mp.setenv(BODY_TIMEOUT_ENV, str(BODY_TIMEOUT_S))
        # A short drain window: the drain test needs the sequence, not a load balancer's time.
        ts = rel.engine_for("torchserve", store, tmp_path_factory.mktemp("ts"), drain_window_s=0.5)
        ray = rel.engine_for("ray", store, tmp_path_factory.mktemp("ray"), drain_window_s=0.5)
        for engine in (ray, ts):  # both load at once (nothing is timed while they start); stopped however this ends
            stack.callback(engine.stop)
            engine.launch()
        for engine in (ts, ray):
            engine.wait_ready()
        yield {"torchserve": ts, "ray": ray}


def test_the_corpus_gets_the_same_4xx_json_error_on_both_engines_and_leaves_them_healthy(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]]
) -> None:
    cases = load_corpus()
    assert len(cases) >= 60
    results = {n: run_corpus(rel.target_of(e), cases, oracle[0], limit_bytes=rel.LIMIT_BYTES) for n, e in engines.items()}
    for name, rows in results.items():
        failed = [(r.case, r.expected, r.status, r.detail) for r in rows if not r.passed]
        assert not failed, f"{name}: {failed}"
        assert all(400 <= r.status < 500 for r in rows)
    ts = {r.case: r.status for r in results["torchserve"]}
    ray = {r.case: r.status for r in results["ray"]}
    assert ts == ray
    assert {413, 415, 404, 400} <= set(ts.values())


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_http_fuzz_never_gets_a_5xx_a_hang_or_a_wrong_answer(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]], engine: str
) -> None:
    result = run_fuzz(rel.target_of(engines[engine]), oracle[0], oracle[1]["dynamic_router"], requests=FUZZ_REQUESTS, seed=5)
    assert result.requests == FUZZ_REQUESTS and not result.no_answer
    assert not result.server_errors and not result.wrong_answers
    assert result.healthy_after
    assert sum(n for s, n in result.by_status.items() if 400 <= s < 500) > FUZZ_REQUESTS // 2


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_load_with_every_answer_checked_against_eager(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]], engine: str
) -> None:
    pool = make_pool(oracle[0], sorted(oracle[1]))
    shots = run_load(rel.target_of(engines[engine]), pool, requests_total=LOAD_REQUESTS, concurrency=CONCURRENCY)
    s = summarize(engine, shots, CONCURRENCY)
    assert s.requests == LOAD_REQUESTS
    assert (s.errors, s.wrong_answers, s.lost) == (0, 0, 0), s.failures
    assert set(s.by_endpoint) == set(oracle[1]) and set(s.by_batch) == {"1", "2", "4", "8"}
    assert 0 < s.latency_p50_ms <= s.latency_p99_ms <= s.latency_max_ms


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_a_killed_worker_is_replaced_and_only_in_flight_requests_may_fail(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]], engine: str
) -> None:
    e = engines[engine]
    pool = make_pool(oracle[0], sorted(oracle[1]))
    result = run_fault(
        rel.target_of(e), pool, endpoint=rel.FAULT_ENDPOINT, what="kill",
        find_pid=lambda: rel.first_pid(e, rel.FAULT_ENDPOINT),
        requests_total=FAULT_REQUESTS, concurrency=CONCURRENCY, kill_after=FAULT_REQUESTS // 4,
    )  # fmt: skip
    assert result.recovered, result
    assert result.wrong_answers == 0, result.failures
    assert result.failed_not_in_flight == 0, result.failures
    assert result.in_flight_at_kill <= CONCURRENCY and result.failed <= 2 * CONCURRENCY
    assert result.requests == FAULT_REQUESTS
    assert healthy(rel.target_of(e), oracle[0], seed=9) == ""


def test_ray_serve_is_on_loopback_and_enforces_the_token(engines: dict[str, Engine]) -> None:
    access = rel.ray_access(engines["ray"])
    assert access["http_loopback_only"], access
    assert access["inference_with_token"] == 200
    assert access["inference_without_token"] == 400


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_slow_and_idle_clients_do_not_stop_normal_clients(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]], engine: str
) -> None:
    pool = make_pool(oracle[0], sorted(oracle[1]), batches=(1, 2))
    linger = BODY_TIMEOUT_S + 2 if engine == "ray" else 0.0  # TorchServe 0.12 has no body timeout to wait for
    r = run_slow_clients(
        rel.target_of(engines[engine]), pool, requests_total=SLOW_REQUESTS, idle_connections=50, slow_senders=5,
        linger_s=linger,
    )  # fmt: skip
    # Served, all of them, and correctly (the p99 ratio is measured by `make reliability`, not asserted here).
    assert r.clean_failed == 0 and r.noisy_failed == 0 and r.wrong_answers == 0, r
    if engine == "ray":
        assert r.senders_cut == 5 and max(r.sender_cut_after_s) < BODY_TIMEOUT_S + 2, r


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_a_short_soak_checks_every_answer_and_samples_memory(
    engines: dict[str, Engine], oracle: tuple[Oracle, dict[str, Signature]], engine: str
) -> None:
    pool = make_pool(oracle[0], sorted(oracle[1]), batches=(1, 2))
    r = run_soak(rel.target_of(engines[engine]), engines[engine].pid, pool, requests_total=SOAK_REQUESTS, sample_s=0.1)
    assert r.requests == SOAK_REQUESTS and r.failed == 0 and r.wrong_answers == 0
    assert len(r.samples) >= 3 and min(m for _, m in r.samples) > 100  # the whole server tree, workers included
    assert r.growth < SOAK_GROWTH_LIMIT, r.as_dict() | {"samples": r.samples[-5:]}


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_a_drain_under_load_loses_nothing_and_a_restart_gives_identical_outputs(
    engines: dict[str, Engine],
    oracle: tuple[Oracle, dict[str, Signature]],
    store: Path,
    tmp_path: Path,
    engine: str,
) -> None:
    endpoints = sorted(oracle[1])
    target = rel.target_of(engines[engine])
    before = rel.fixed_outputs(target, oracle[0], endpoints)
    # The graceful stop `torchship serve` runs on SIGTERM, under 16 clients sending checked requests.
    pool = make_pool(oracle[0], endpoints, batches=(1, 2))
    drained = run_drain(engine_stoppable(engines[engine], target), pool, clients=CONCURRENCY, signal_after_s=0.5)
    assert not drained.violations, drained.violations[:5]
    assert drained.sent_before_signal > 0 and drained.answered_before_signal_ok == drained.sent_before_signal
    assert drained.exit_s is not None and drained.exit_s <= drained.bound_s, drained
    assert not engines[engine].running()
    with rel.engine_for(engine, store, tmp_path / "again") as again:
        after = rel.fixed_outputs(rel.target_of(again), oracle[0], endpoints)
    assert len(before) == len(endpoints) * 4
    assert rel.differing(before, after) == []
    if engine == "ray":
        assert replica_pids(rel.FAULT_ENDPOINT) == []  # the restarted Ray is gone too


@pytest.fixture(scope="module")
def model_api_server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """A TorchServe with its management API able to register models (from the store only)."""
    with rel.engine_for("torchserve", store, tmp_path_factory.mktemp("ts_api"), overrides={"enable_model_api": "true"}) as ts:
        assert isinstance(ts, TorchServe)
        yield ts


def test_torchserve_tokens_loopback_and_allowed_urls(model_api_server: TorchServe, store: Path, tmp_path: Path) -> None:
    access = rel.torchserve_access(model_api_server, store, tmp_path / "outside")
    assert access["inference_with_token"] == 200 and access["management_with_token"] == 200
    for key in (
        "inference_without_token", "inference_with_management_key", "management_without_token",
        "management_with_inference_key", "register_remote_url", "register_outside_store", "register_path_traversal",
    ):  # fmt: skip
        assert 400 <= access[key] < 500, (key, access[key])
    assert access["all_loopback"], access["listening"]
    assert len(access["listening"]) >= 3  # inference, management, metrics (and gRPC): each one checked


def test_loopback_addresses_are_told_apart() -> None:
    assert rel.is_loopback("127.0.0.1:8080") and rel.is_loopback("::ffff:127.0.0.1:8080") and rel.is_loopback("::1:80")
    assert not rel.is_loopback("0.0.0.0:8080") and not rel.is_loopback(":::8080") and not rel.is_loopback("10.0.0.1:80")


# Both tampers on TorchServe; one on Ray (a Ray start is ~20 s of make test): the replica runs the same handler core
# whose refusal of each tamper tests/integration/test_integrity.py checks in-process. `make reliability` runs all four.
@pytest.mark.parametrize(
    ("engine", "tamper"), [("torchserve", "changed byte"), ("torchserve", "manifest sha256"), ("ray", "changed byte")]
)
def test_a_tampered_archive_is_refused_at_load_with_a_clear_error(store: Path, tmp_path: Path, tamper: str, engine: str) -> None:
    bad = rel.TAMPERS[tamper](store / f"{rel.FAULT_ENDPOINT}.mar", tmp_path / "store" / f"{rel.FAULT_ENDPOINT}.mar")
    refusal = rel.refuses(engine, bad, tmp_path / "run")
    assert refusal.refused, refusal
    assert "sha256" in refusal.message and "rebuild the archive" in refusal.message, refusal.message


def test_the_ray_unpacker_refuses_path_traversal(tmp_path: Path) -> None:
    results = rel.unpack_refuses_traversal(tmp_path)
    assert len(results) == 3
    assert all(r["refused"] and not r["written_outside"] for r in results.values()), results


def test_a_version_rollout_under_load_is_gated_and_loses_nothing(
    model_api_server: TorchServe, oracle: tuple[Oracle, dict[str, Signature]], tmp_path: Path
) -> None:
    """Version 2 registered beside version 1 while 16 clients send checked requests: one that fails its parity gate
    is never made the default; one that passes is, and version 1 is unregistered without a lost request."""
    rows = rollout_checks(model_api_server, tmp_path, oracle[0].tolerances[ROLLOUT_MODEL], lambda _: None)
    refused, switched = rows
    assert refused["outcome"] == "refused" and not refused["gate_passed"]
    assert set(refused["answered_by"]) == {"1.0"}
    assert switched["outcome"] == "switched" and switched["gate_passed"]
    assert switched["answered_by"].get(NEW_VERSION, 0) > 0
    for row in rows:
        assert row["passed"], row
        assert row["failed"] == 0 and row["wrong_answers"] == 0 and row["header_mismatch"] == 0 and row["old_after_switch"] == 0
