"""The names every side of torchship shares, defined once: archive entries, HTTP headers, the bearer scheme and the
environment variables the handler reads. stdlib only: this module travels inside every .mar."""

from __future__ import annotations

# -- archive entries (what `torchship archive` writes and the handler, engines and verify read) ----------------------
MANIFEST_FILE = "manifest.json"
REFERENCE_FILE = "reference.pt"
ENDPOINT_FILE = "endpoint.json"
MODEL_CONFIG_FILE = "model-config.yaml"
MAR_MANIFEST_FILE = "MAR-INF/MANIFEST.json"
#: The endpoint's OIP v2 model metadata (`GET /v2/models/<endpoint>`), written by `torchship archive` with the
#: handler's own code (codec.model_metadata): TorchServe's inference port serves this file
#: (torchship/engines/torchserve/oip_agent.py).
OIP_METADATA_FILE = "oip-metadata.json"
#: sha256 of every other entry, written by `torchship archive`: a changed byte anywhere refuses the load.
CHECKSUMS_FILE = "torchship-checksums.json"
#: `torchship archive --sign`'s ed25519 signature of the checksum listing (not listed in it; torchship/archive/signing.py).
SIGNATURE_FILE = "torchship-signature.json"
#: The verify key's file (ed25519 public key, PEM) for launchers and the Ray app: set, only signed archives are served.
VERIFY_KEY_ENV = "TORCHSHIP_VERIFY_KEY_FILE"
#: A classifier's top-k post-processing (the seed's scripted function), exported with the classifier.
TOPK_FILE = "process_outputs.torchscript.pt"
#: The file torch-model-archiver puts at the archive root as TorchServe's handler (handlers/entry.py).
HANDLER_ENTRY_FILE = "torchship_entry.py"
#: The handler package's name inside an archive: a name no other distribution uses, so nothing on the worker's
#: PYTHONPATH shadows it by accident (and the entry file refuses the load when something does).
HANDLER_PACKAGE = "torchship_handler"
#: The handler package files that travel inside every archive (torch + stdlib only; OpenTelemetry when tracing is on).
HANDLER_PACKAGE_FILES = (
    "__init__.py",
    "codec.py",
    "core.py",
    "errors.py",
    "metrics.py",
    "names.py",
    "parity.py",
    "service.py",
    "tracing.py",
    "wire.py",
)

# -- HTTP ------------------------------------------------------------------------------------------------------------
#: OIP v2 binary-data extension: length of the JSON header that precedes the raw tensor bytes (lower-case).
BINARY_HEADER = "inference-header-content-length"
#: How many requests the engine handed the handler together, and how many rows the model ran for this one.
BATCH_REQUESTS_HEADER = "X-Torchship-Batch-Requests"
BATCH_ROWS_HEADER = "X-Torchship-Batch-Rows"
#: Where the request's time went on the server, in milliseconds (W3C Server-Timing): the handler's decode, model
#: and encode, its whole batch call, and on the Ray app the ingress's total.
TIMING_HEADER = "Server-Timing"
#: The model version that answered (the archive's manifest version): during a version rollout, which one it was.
VERSION_HEADER = "X-Torchship-Model-Version"
#: Which Ray node answered (the Ray app only).
NODE_HEADER = "X-Torchship-Node"
AUTHORIZATION_HEADER = "authorization"
#: Set by TorchServe on the OIP routes it hands the handler: "True" on `/v2/models/<m>/explain`, "False" on `/infer`
#: (the Ray app sets it the same way). torchship endpoints serve no explanations.
EXPLAIN_HEADER = "explain"
BEARER_PREFIX = "Bearer "

# -- environment -------------------------------------------------------------------------------------------------------
#: A shared inference token (a Kubernetes Secret), checked by the handler where the engine cannot check one itself.
TOKEN_ENV = "TORCHSHIP_INFERENCE_TOKEN"
TOKEN_FILE_ENV = "TORCHSHIP_INFERENCE_TOKEN_FILE"
#: The body limit the handler enforces with a JSON 413 (the launchers set it from config.properties).
MAX_REQUEST_BYTES_ENV = "TORCHSHIP_MAX_REQUEST_BYTES"
#: Graceful drain of a TorchServe (torchship/engines/torchserve/drain.py, run by the launcher or a pod's preStop): the
#: drain writes a random marker into this file and sends each endpoint one request carrying it in DRAIN_HEADER. Requests queued
#: ahead of the marker are answered as usual; the marker and everything behind it get a JSON 503
#: (DRAINING_MESSAGE), so the marker's 503 means the endpoint holds no accepted work. Without a marker the file
#: does nothing (a stale one left in a pod's emptyDir cannot turn a restarted server away).
DRAIN_FILE_ENV = "TORCHSHIP_DRAIN_FILE"
DRAIN_HEADER = "X-Torchship-Drain"
DRAINING_MESSAGE = "server is shutting down; retry on another replica"

#: The folder each worker or replica writes its metrics snapshot into (handlers/metrics.py); `torchship serve
#: --metrics-port` and the Kubernetes overlays' exporter read it. Unset: no metrics are kept.
METRICS_DIR_ENV = "TORCHSHIP_METRICS_DIR"
#: Seconds between a replica's re-runs of its references while it serves (the model config's parityProbeIntervalS;
#: this variable, when set, wins: the Kubernetes overlays turn the probe on with it). 0 or unset: no probe.
PARITY_PROBE_ENV = "TORCHSHIP_PARITY_PROBE_S"
PARITY_PROBE_KEY = "parityProbeIntervalS"
#: The log line of a replica whose answers stopped matching its references while it served.
PARITY_LOST_MARKER = "TORCHSHIP-PARITY-LOST"
#: Set on the 503 a replica that lost parity answers: the request never reached its model and may go to another
#: replica (the Ray ingress sends it again; a TorchServe client retries after Retry-After).
PARITY_LOST_HEADER = "X-Torchship-Parity-Lost"
#: A test hook, never set in production: `<endpoint>=<delta>[@<after_s>][,...]` adds delta to every floating-point
#: output of that endpoint's model in this process (after_s seconds after it loaded, when given), so a test can make a
#: replica's answers differ from its references at load or while it serves.
TEST_DRIFT_ENV = "TORCHSHIP_TEST_DRIFT"
#: With the hook: a file only the first process to create it drifts in, so one replica of several drifts.
TEST_DRIFT_CLAIM_ENV = "TORCHSHIP_TEST_DRIFT_CLAIM"

#: Every refusal to load an archive (tampered, wrong handler code, unsafe entry) starts with this marker, in the
#: exception message and so in the engine's log or deployment status: engines report load refusals by it.
LOAD_REFUSED_MARKER = "TORCHSHIP-LOAD-REFUSED"


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header that carries `token` (none when there is no token)."""
    return {"Authorization": f"{BEARER_PREFIX}{token}"} if token else {}
