"""The one checked load loop against a small local HTTP server that answers each path one way: every outcome is told
apart, every bound ends a run, tags and kept headers reach the shots, and the picks are the ones asked for."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from torchship.errors import TorchshipError
from torchship.handlers.codec import encode_request, encode_response
from torchship.spec import Tolerance
from torchship.verify import load
from torchship.verify.load import HttpReply, LoadRequest

EXPECTED = torch.tensor([[1.0, 2.0, 3.0]])
TOL = Tolerance(1e-6, 1e-6)
HANG_S = 3.0


def _answer(out: torch.Tensor) -> bytes:
    body, _ = encode_response({"y": out}, model_name="m", model_version="1", request_id=None)
    return body


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        path = self.path.rsplit("/", 1)[-1]
        if path == "close":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if path == "hang":
            time.sleep(HANG_S)
        status, body = {
            "ok": (200, _answer(EXPECTED)),
            "wrong": (200, _answer(EXPECTED + 1)),
            "garbled": (200, b"not json"),
            "shed": (503, b'{"error": "queue full"}'),
            "error": (500, b"boom"),
            "hang": (200, _answer(EXPECTED)),
        }[path]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Torchship-Model-Version", "7")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _request(path: str, check: load.Check | None = None) -> LoadRequest:
    body, headers = encode_request({"x": torch.zeros(1, 3)})
    return LoadRequest("m", body, headers, check or load.expect_outputs(("y",), (EXPECTED,), TOL), path=f"/predictions/{path}")


def test_every_outcome_is_told_apart(url: str) -> None:
    paths = ["ok", "wrong", "garbled", "shed", "error", "close", "hang"]
    shots = load.run_load(url, [_request(p) for p in paths], clients=1, requests_total=len(paths), timeout_s=HANG_S / 2)
    assert [s.outcome for s in shots] == ["ok", "wrong", "wrong", "shed", "error", "refused", "hung"]
    assert [s.status for s in shots] == [200, 200, 200, 503, 500, 0, 0]
    assert "undecodable 200" in shots[2].detail and "wrong answer" in shots[1].detail
    assert all(s.end_s >= s.start_s for s in shots)


def test_a_count_bound_sends_exactly_that_many_and_picks_as_asked(url: str) -> None:
    pool = [_request("ok"), _request("shed")]
    shots = load.run_load(url, pool, clients=4, requests_total=40, pick=load.cycle(2, step=1))
    assert len(shots) == 40 and [s.index for s in shots] == list(range(40))
    for s in shots:  # client n's i-th request is pool[(n + i) % 2]
        assert s.outcome == ("ok" if s.request == 0 else "shed")
    picked = [s.request for s in load.run_load(url, pool, clients=1, requests_total=20, pick=load.seeded_random(2, seed=5))]
    again = [s.request for s in load.run_load(url, pool, clients=3, requests_total=20, pick=load.seeded_random(2, seed=5))]
    assert picked == again and set(picked) == {0, 1}  # the same run sends the same requests, whatever the clients


def test_a_duration_a_stop_event_and_on_shot_each_end_a_run(url: str) -> None:
    started = time.monotonic()
    shots = load.run_load(url, [_request("ok")], clients=2, duration_s=0.5)
    assert shots and time.monotonic() - started < 5
    stop = threading.Event()
    run = load.start_load(url, [_request("ok")], clients=2, stop=stop)
    time.sleep(0.3)
    stop.set()
    assert run.join(10) and not run.alive()
    # on_shot: each client stops after its third answer.
    counts: dict[int, int] = {}

    def third(shot: load.Shot) -> bool:
        counts[shot.client] = counts.get(shot.client, 0) + 1
        return counts[shot.client] >= 3

    assert len(load.run_load(url, [_request("ok")], clients=4, on_shot=third)) == 12


def test_a_run_needs_a_bound_and_a_pool(url: str) -> None:
    with pytest.raises(TorchshipError, match="needs a bound"):
        load.LoadRun(url, [_request("ok")], clients=1)
    with pytest.raises(TorchshipError, match="at least one request"):
        load.LoadRun(url, [], clients=1, requests_total=1)


def test_tags_and_kept_headers_reach_the_shots(url: str) -> None:
    def versioned(reply: HttpReply) -> tuple[str, str]:
        return "", reply.headers["x-torchship-model-version"]

    shots = load.run_load(
        url, [_request("ok", versioned)], clients=1, requests_total=2, keep_headers=("X-Torchship-Model-Version",)
    )
    assert [(s.tag, dict(s.headers)) for s in shots] == [("7", {"x-torchship-model-version": "7"})] * 2
