"""TorchServe's config.properties for a pod: configs/config.properties with the pod's addresses, token rule, model
store and body limits. The Deployment's ConfigMap (`torchship deploy sync`) and the KServe storage folder
(`torchship deploy kserve-store`) are both written from here, so every TorchServe pod runs the same settings.
"""

from __future__ import annotations

from torchship.settings import CONFIG_PROPERTIES, FRONTEND_LIMIT_FACTOR, config_file, default_body_limit_bytes, read_properties

#: Where the images keep the archives (docker/*.Dockerfile).
IMAGE_MODEL_STORE = "/opt/torchship/model_store"
#: Where the TorchServe image keeps torchship's OIP agent (torchship/engines/torchserve/oip_agent.py).
IMAGE_OIP_AGENT_JAR = "/opt/torchship/torchship-oip.jar"
#: The pod's listeners. Inference and metrics listen on the pod IP; management stays on loopback (probes only).
INFERENCE_PORT = 8080
MANAGEMENT_PORT = 8081
METRICS_PORT = 8082
MANAGEMENT_URL = f"http://127.0.0.1:{MANAGEMENT_PORT}"


def frontend_limit_bytes(limit_bytes: int) -> int:
    """TorchServe's own body cut for a handler limit of `limit_bytes`: the local launcher's rule. TorchServe's
    frontend answers a body over max_request_size with an empty 413 before any handler runs, so it must sit above
    the handler's limit for an over-limit body to get the handler's JSON 413."""
    return limit_bytes * FRONTEND_LIMIT_FACTOR


def pod_overrides(model_store: str = IMAGE_MODEL_STORE, *, gpu: bool = False) -> dict[str, str]:
    """What a pod changes in configs/config.properties.

    TorchServe's own token auth is off because it makes new random keys in every pod; the handler checks the shared
    token from the Secret instead (TORCHSHIP_INFERENCE_TOKEN_FILE). max_request_size is TorchServe's cut; the handler's
    limit (TORCHSHIP_MAX_REQUEST_BYTES in the pod's env) is configs/config.properties' max_request_size.
    """
    overrides = {
        "inference_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "management_address": MANAGEMENT_URL,
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "disable_token_authorization": "true",
        "model_store": model_store,
        "allowed_urls": "file://" + model_store + "/.*\\\\.mar",
        # The image's OIP agent: model metadata and readiness on the inference port (torchship/engines/torchserve/oip_agent.py).
        "vmargs": f"-XX:MaxRAMPercentage=50 -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir=/tmp -javaagent:{IMAGE_OIP_AGENT_JAR}",
        "max_request_size": str(frontend_limit_bytes(default_body_limit_bytes())),
    }
    if gpu:
        overrides["number_of_gpu"] = "1"
    return overrides


def pod_properties(model_store: str = IMAGE_MODEL_STORE, *, gpu: bool = False) -> dict[str, str]:
    """configs/config.properties as a pod runs it (pod_overrides applied, in the file's order, new keys last)."""
    return {**read_properties(config_file(CONFIG_PROPERTIES)), **pod_overrides(model_store, gpu=gpu)}


def properties_text(props: dict[str, str], header: str) -> str:
    """A config.properties file: `header` as comment lines, then one `key=value` per line."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return head + "".join(f"{k}={v}\n" for k, v in props.items())
