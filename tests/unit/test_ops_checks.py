"""Each operations check can fail: a server that drops in-flight requests, memory that keeps growing, normal clients
slowed by slow ones. The verdicts are computed from records like the ones the e2e runs produce."""

from __future__ import annotations

from torchship.reliability.ops import (
    SOAK_GROWTH_LIMIT,
    DrainResult,
    SlowClientsResult,
    SoakResult,
    judge_drain,
    memory_growth,
    ops_problems,
)
from torchship.reliability.rollout import RolloutResult, summarize_rollouts
from torchship.verify.load import Shot

SIGNAL = 100.0


def DrainShot(start_s: float, end_s: float, status: int, outcome: str, detail: str = "") -> Shot:  # noqa: N802
    """A drain client's record, as the load loop writes it."""
    return Shot(0, 0, 0, "dynamic_router", 1, False, start_s, end_s, status, outcome, detail)


def _drain(shots: list[Shot], exit_code: int | None = 0, exit_s: float | None = 3.0) -> DrainResult:
    counts, violations = judge_drain(shots, SIGNAL)
    return DrainResult("torchserve", 16, 3.0, exit_code, exit_s, 30.0, **counts, violations=violations)


def _ok(at: float) -> Shot:
    return DrainShot(at, at + 0.05, 200, "ok")


def test_a_clean_drain_passes() -> None:
    refused = [DrainShot(100.5, 100.51, 503, "shed", "draining"), DrainShot(101.0, 101.0, 0, "refused", "conn refused")]
    result = _drain([_ok(99.0), _ok(99.9), _ok(100.2), *refused])
    assert result.passed and result.sent_before_signal == 2 and result.after_refused_503 == 1
    assert result.after_refused_connection == 1


def test_a_server_that_drops_in_flight_requests_fails_the_drain() -> None:
    # Sent before the signal, reset by the server: what TorchServe's own SIGTERM does to accepted requests.
    dropped = DrainShot(99.95, 100.01, 0, "refused", "ConnectionResetError")
    result = _drain([_ok(99.0), dropped])
    assert not result.passed and len(result.violations) == 1 and "-0.050 s" in result.violations[0]


def test_wrong_answers_hangs_and_slow_or_failed_exits_fail_the_drain() -> None:
    assert not _drain([_ok(99.0), DrainShot(100.5, 100.6, 200, "wrong", "max abs 1")]).passed
    assert not _drain([_ok(99.0), DrainShot(100.5, 130.5, 0, "hung")]).passed
    assert not _drain([_ok(99.0)], exit_code=1).passed
    assert not _drain([_ok(99.0)], exit_s=45.0).passed
    assert not _drain([_ok(99.0)], exit_code=None, exit_s=None).passed


def _soak(samples: list[tuple[float, float]], failed: int = 0) -> SoakResult:
    warm, end, growth = memory_growth(samples, 10.0)
    return SoakResult("ray", 1000, 16, 1000 - failed, failed, 0, 60.0, samples, 10.0, warm, end, growth)


def test_flat_memory_passes_the_soak_and_growing_memory_fails_it() -> None:
    flat = [(float(t), 1000.0 + (t % 3)) for t in range(60)]
    assert _soak(flat).passed
    leaking = [(float(t), 1000.0 + 10 * t) for t in range(60)]  # +50% from warm-up to the end
    leak = _soak(leaking)
    assert not leak.passed and leak.growth > SOAK_GROWTH_LIMIT
    assert not _soak(flat, failed=1).passed


def _slow(noisy_p99: float) -> SlowClientsResult:
    return SlowClientsResult("torchserve", 200, 20, 0.1, 100.0, noisy_p99, noisy_p99 / 100.0, 0, 0, 0, 0, [], 200)


def test_normal_clients_slowed_past_the_limit_fail_the_slow_client_check() -> None:
    assert _slow(250.0).passed
    assert not _slow(301.0).passed


def test_each_failed_operations_check_is_named() -> None:
    doc = {
        "slow_clients": _slow(400.0).as_dict(),
        "soak": _soak([(float(t), 1000.0 + 10 * t) for t in range(60)]).as_dict(),
        "drain": _drain([DrainShot(99.95, 100.01, 0, "refused", "reset")]).as_dict(),
    }
    found = ops_problems("ray", doc)
    assert len(found) == 3
    assert "p99" in found[0] and "memory grew" in found[1] and "drain" in found[2]


def _rollout(outcome: str, gate_passed: bool, old_after_switch: int = 0, failed: int = 0) -> RolloutResult:
    by = {"1.0": 500, "2.0": 200}
    return RolloutResult("torchserve", "dynamic_router", outcome, gate_passed, 700, failed, 0, 0, by, old_after_switch, 3.0, [])


def test_a_switch_without_a_passed_gate_fails_the_rollout_check() -> None:
    assert _rollout("switched", gate_passed=True).passed
    assert _rollout("refused", gate_passed=False).passed
    assert not _rollout("switched", gate_passed=False).passed  # switched although the gate failed
    assert not _rollout("refused", gate_passed=True).passed
    assert not _rollout("switched", gate_passed=True, old_after_switch=3).passed  # the old version still answering
    assert not _rollout("switched", gate_passed=True, failed=1).passed
    rows = [_rollout("switched", gate_passed=False).as_dict() | {"case": "x"}]
    assert len(summarize_rollouts(rows)) == 1
