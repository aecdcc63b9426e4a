"""A small client for torchship endpoints (TorchServe or the Ray app): token, JSON and binary bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch

from torchship.errors import EndpointError, TorchshipError
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.names import bearer


@dataclass
class InferResult:
    outputs: dict[str, torch.Tensor]
    model_name: str
    model_version: str
    id: str | None
    headers: Mapping[str, str]


def token_from_key_file(path: Path) -> str:
    """The inference key from TorchServe's key_file.json, or the whole file when it holds just a token (a Secret)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TorchshipError(f"cannot read the inference token from {path}: {exc}") from None
    if not text.startswith("{"):
        if not text:
            raise TorchshipError(f"{path} is empty")
        return text
    try:
        key: str = json.loads(text)["inference"]["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TorchshipError(f"cannot read the inference key from {path}: {exc}") from None
    return key


@dataclass
class Client:
    base_url: str
    token: str | None = None
    timeout_s: float = 120.0
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    def post_raw(self, endpoint: str, body: bytes, headers: Mapping[str, str]) -> requests.Response:
        return self.session.post(
            f"{self.base_url.rstrip('/')}/predictions/{endpoint}",
            data=body,
            headers={**self.headers(), **headers},
            timeout=self.timeout_s,
        )

    def infer(
        self,
        endpoint: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        binary: bool = False,
        binary_output: bool = False,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        params = dict(parameters or {})
        if binary_output:
            params["binary_data_output"] = True
        body, headers = encode_request(inputs, binary=binary, parameters=params, request_id=request_id)
        r = self.post_raw(endpoint, body, headers)
        if r.status_code != 200:
            try:
                doc = r.json()
                message = str(doc.get("error") or doc.get("message") or doc)
            except ValueError:
                message = r.text[:500]
            raise EndpointError(r.status_code, message)
        doc = decode_response(r.content, r.headers.get("Inference-Header-Content-Length"))
        return InferResult(doc["outputs"], doc["model_name"], doc["model_version"], doc.get("id"), r.headers)
