"""The verdict of `torchship reliability`: a clean report passes, and each kind of failure is named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from torchship.reliability.corpus import load_corpus
from torchship.reliability.run import markdown, problems, summary_row


def _engine_doc(status: int = 400) -> dict[str, Any]:
    return {
        "corpus": [{"case": c.id, "status": c.status if status == 400 else status, "passed": True} for c in load_corpus()],
        "fuzz": {"requests": 10, "by_status": {400: 9, 200: 1}, "no_answer": [], "wrong_answers": [], "healthy_after": True},
        "load": {"requests": 100, "errors": 0, "lost": 0, "wrong_answers": 0, "latency_p99_ms": 12.5, "requests_per_s": 50.0},
        "fault": {
            "engine": "x", "endpoint": "dynamic_router", "what": "kill", "killed_pid": 10, "replacement_pid": 11,
            "requests": 50, "failed": 1, "in_flight_at_kill": 4, "failed_sent_after_kill": 0, "failed_not_in_flight": 0,
            "wrong_answers": 0, "lost": 0,
            "recovery_s": 2.5, "failures": [], "recovered": True,
        },
        "restart_identical": True,
    }  # fmt: skip


def _report() -> dict[str, Any]:
    engines = {"torchserve": _engine_doc(), "ray": _engine_doc()}
    return {
        "summary": [summary_row(n, d) for n, d in engines.items()],
        "engines": engines,
        "integrity": [{"engine": "torchserve", "tamper": "changed byte", "refused": True, "message": "m", "seconds": 1.0}],
        "signatures": [
            {"case": "signed", "checker": "verify_store", "refused": False, "message": "accepted"},
            {"case": "unsigned", "checker": "torchserve", "refused": True, "message": "not signed"},
            {"case": "unsigned", "checker": "ray-app", "refused": True, "message": "not signed"},
        ],
        "traversal": {"dotdot": {"refused": True, "written_outside": []}},
        "unpickling_calls": [],
        "access": {
            "torchserve": {
                "inference_without_token": 400, "inference_with_management_key": 400, "management_without_token": 400,
                "management_with_inference_key": 400, "register_remote_url": 400, "register_outside_store": 400,
                "register_path_traversal": 400, "inference_with_token": 200, "management_with_token": 200,
                "listening": ["127.0.0.1:1"], "all_loopback": True,
            },
            "ray": {"http_loopback_only": True, "inference_with_token": 200, "inference_without_token": 400},
        },
    }  # fmt: skip


def test_a_clean_report_passes_and_its_table_has_a_row_per_engine() -> None:
    report = _report()
    assert problems(report) == []
    table = markdown(report)
    assert table.count("\n| torchserve |") == 1 and table.count("\n| ray |") == 1
    row = report["summary"][0]
    assert row["cases_tried"] == len(load_corpus()) + 10 and row["5xx"] == 0 and row["recovered"] == 1


def _break(path: str, value: Any) -> dict[str, Any]:
    report = copy.deepcopy(_report())
    node: Any = report
    keys = path.split("/")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[keys[-1]] = value
    engines = report["engines"]
    report["summary"] = [summary_row(n, d) for n, d in engines.items()]
    return report


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("engines/ray/corpus/0/passed", False, "corpus cases failed"),
        ("engines/ray/corpus/0/status", 418, "different statuses"),
        ("engines/torchserve/fuzz/by_status", {500: 1}, "5xx"),
        ("engines/torchserve/load/wrong_answers", 1, "load_wrong_answers"),
        ("engines/ray/load/lost", 2, "load_errors"),
        ("engines/ray/fault/failed_not_in_flight", 1, "fault_failed_not_in_flight"),
        ("engines/ray/fault/replacement_pid", None, "not replaced"),
        ("engines/torchserve/restart_identical", False, "restart"),
        ("integrity/0/refused", False, "not refused"),
        ("signatures/1/refused", False, "signatures: torchserve accepted the unsigned archive"),
        ("signatures/0/refused", True, "signatures: verify_store refused the signed archive"),
        ("traversal/dotdot/refused", False, "not refused"),
        ("unpickling_calls", ["x.py:1: torch.load without weights_only=True"], "weights_only"),
        ("access/torchserve/management_without_token", 200, "management_without_token"),
        ("access/torchserve/all_loopback", False, "beyond loopback"),
        ("access/ray/http_loopback_only", False, "ray access"),
    ],
)
def test_each_failure_is_named(path: str, value: Any, expect: str) -> None:
    found = problems(_break(path, value))
    assert any(expect in p for p in found), found
