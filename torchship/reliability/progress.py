"""Progress of a long run with an estimate of the time left.

Every progress line starts a step. The estimate is what the same steps took in an earlier run with the same counts:
the last report in the output folder (its "steps"), else the step times recorded here from the last full run
(STEP_TIMES_FILE); steps are matched by their text with the numbers taken out, in order, and the estimate is
scaled by how this run's pace compares with the earlier one's so far. Without an earlier run, only the elapsed time.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Step times of the last full `make reliability` here (written from its report's "steps").
STEP_TIMES_FILE = Path(__file__).with_name("step_times.json")


def step_key(line: str) -> str:
    """A step's text without its numbers (counts and paths change between runs; the step does not)."""
    return re.sub(r"\d+", "#", line.split(" on /", 1)[0]).strip()


def earlier_steps(report: Path, counts: dict[str, Any]) -> list[tuple[str, float]]:
    """The steps of an earlier run with these counts: the report at `report`, else the recorded full run."""
    for path in (report, STEP_TIMES_FILE):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if doc.get("step_counts") == counts and isinstance(doc.get("steps"), list):
            return [(str(k), float(s)) for k, s in doc["steps"]]
    return []


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


class StepClock:
    """Wraps a progress printer: each line gets the time, the run's elapsed time and an estimate of the time left."""

    def __init__(self, emit: Callable[[str], None], earlier: Sequence[tuple[str, float]] = ()) -> None:
        self.emit = emit
        self.earlier = list(earlier)
        self.started = time.monotonic()
        self.steps: list[tuple[str, float]] = []  # (key, start offset)
        self._matched = -1

    def __call__(self, line: str) -> None:
        now = time.monotonic() - self.started
        key = step_key(line)
        self.steps.append((key, now))
        left = self._left(key, now)
        estimate = f", ~{_clock(left)} left" if left is not None else ""
        self.emit(f"{time.strftime('%H:%M:%S')} [{_clock(now)} elapsed{estimate}] {line}")

    def _left(self, key: str, now: float) -> float | None:
        if not self.earlier:
            return None
        found = next((i for i in range(self._matched + 1, len(self.earlier)) if self.earlier[i][0] == key), None)
        if found is None:
            return None
        self._matched = found
        # This step and every later one, as long as the earlier run took them; scaled by how this run compares so far.
        done_before = sum(s for _, s in self.earlier[:found])
        scale = now / done_before if done_before > 60 else 1.0
        return sum(s for _, s in self.earlier[found:]) * scale

    def times(self) -> list[tuple[str, float]]:
        """Every step with the seconds it took (the last one up to now)."""
        end = time.monotonic() - self.started
        starts = [s for _, s in self.steps] + [end]
        return [(key, round(starts[i + 1] - starts[i], 1)) for i, (key, _) in enumerate(self.steps)]
