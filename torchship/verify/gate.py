"""The parity gate: every reference input of every archive sent to a candidate revision over HTTP and compared with
the eager outputs recorded at export. `torchship deploy gate` and `deploy rollout` run it before traffic moves to a
new revision on Kubernetes; the Ray child runs it on the candidate app before a rollout (SIGHUP) switches over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torchship.verify.compare import VerifyRow, verify


@dataclass(frozen=True)
class GateResult:
    rows: list[VerifyRow]

    @property
    def failed(self) -> list[VerifyRow]:
        return [r for r in self.rows if not r.passed]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failed


def gate(url: str, *, token: str | None, model_store: Path, endpoints: list[str] | None = None) -> GateResult:
    return GateResult(verify("candidate", url, token=token, model_store=model_store, endpoints=endpoints))
