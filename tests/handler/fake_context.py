"""A stand-in for TorchServe's context: what the handler reads and what it sets, recorded per request."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class FakeContext:
    def __init__(self, model_dir: Path, headers: list[dict[str, str]] | None = None, gpu_id: int | None = None) -> None:
        self._props = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 8}
        self.request_headers = headers or []
        self.statuses: dict[int, tuple[int, str]] = {}
        self.response_headers: dict[int, dict[str, str]] = {}
        self.content_types: dict[int, str] = {}

    @property
    def system_properties(self) -> Mapping[str, Any]:
        return self._props

    def get_all_request_header(self, idx: int) -> Mapping[str, str]:
        return self.request_headers[idx] if idx < len(self.request_headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]
