"""make reliability's progress lines: elapsed time, and the time left estimated from an earlier run's steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchship.reliability import progress
from torchship.reliability.progress import StepClock, earlier_steps, step_key


def test_a_step_is_known_by_its_text_without_numbers_or_paths() -> None:
    assert step_key("ray: load, 5000 requests at 16 concurrent clients") == "ray: load, # requests at # concurrent clients"
    assert step_key("starting ray on /tmp/x/store") == "starting ray"


def test_the_estimate_is_what_the_steps_left_took_before(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    earlier = [("starting ray", 30.0), ("ray: load", 100.0), ("ray: soak", 240.0)]
    clock = StepClock(lines.append, earlier)
    clock("starting ray on /s")
    now[0] = 30.0
    clock("ray: load")
    now[0] = 130.0
    clock("an unknown step")
    now[0] = 135.0
    clock("ray: soak")
    assert [line.split("] ", 1)[0].split("[", 1)[1] for line in lines] == [
        "0:00 elapsed, ~6:10 left",
        "0:30 elapsed, ~5:40 left",
        "2:10 elapsed",
        "2:15 elapsed, ~4:09 left",  # this run took 135 s for what took 130 s before: 240 s x 135 / 130
    ]
    assert clock.times() == [("starting ray", 30.0), ("ray: load", 100.0), ("an unknown step", 5.0), ("ray: soak", 0.0)]


def test_earlier_steps_come_from_a_report_with_the_same_counts(tmp_path: Path) -> None:
    report = tmp_path / "reliability.json"
    report.write_text(json.dumps({"step_counts": {"n": 1}, "steps": [["a", 1.5]]}), encoding="utf-8")
    assert earlier_steps(report, {"n": 1}) == [("a", 1.5)]
    assert earlier_steps(report, {"n": 2}) == earlier_steps(tmp_path / "none.json", {"n": 2})
