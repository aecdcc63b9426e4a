"""`torchship deploy check` on the real manifests, and on copies broken in the ways users break them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_cli
from torchship.deploy import kserve
from torchship.deploy.kube import K8S_DIR, K8S_VERSIONS, check, image_repository, render, serve_config, validate_object
from torchship.deploy.pod_config import frontend_limit_bytes
from torchship.deploy.rollout import set_image
from torchship.handlers.names import MAX_REQUEST_BYTES_ENV
from torchship.settings import default_body_limit_bytes

LIMIT = default_body_limit_bytes()


def test_deploy_check_passes_on_the_repository() -> None:
    proc = run_cli("deploy", "check", timeout_s=900)
    assert "checks passed" in proc.stdout and "failed:" not in proc.stdout
    for step in ("validate cpu", "validate gpu", "validate staging", "validate candidate", "validate kserve",
                 "validate kserve-gpu", "ports and probes", "body limit", "graceful drain", "kserve runtime",
                 "kserve-gpu runtime", "yamllint", "hadolint", "checkov"):  # fmt: skip
        assert step in proc.stdout


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, dst)
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


#: Broken copies are validated against the newest Kubernetes only: each schema load costs ~0.1 s per object and
#: version, and what a copy breaks does not depend on the version (test_deploy_check_passes_on_the_repository and the
#: version-specific tests use them all).
NEWEST = K8S_VERSIONS[-1:]


def _check_fails(k8s_dir: Path, expected: str) -> None:
    steps = check(k8s_dir, lint=False, versions=NEWEST)
    failed = [s for s in steps if not s.passed]
    assert failed, "the broken manifests passed every check"
    assert any(expected in s.detail for s in failed), "\n".join(f"{s.name}: {s.detail}" for s in failed)


def test_the_command_exits_non_zero_on_broken_manifests(k8s_copy: Path) -> None:
    _edit(k8s_copy / "base/torchserve/pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy/v1beta1")
    proc = run_cli("deploy", "check", "--k8s-dir", str(k8s_copy), "--no-lint", check=False, timeout_s=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: validate cpu" in proc.stdout.replace("\n", " ")


def test_a_typo_in_a_field_fails(k8s_copy: Path) -> None:
    _edit(k8s_copy / "base/torchserve/deployment.yaml", "  revisionHistoryLimit: 5", "  revisionHistoryLimt: 5")
    _check_fails(k8s_copy, "revisionHistoryLimt")


def test_a_removed_api_version_fails(k8s_copy: Path) -> None:
    _edit(k8s_copy / "base/torchserve/pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy/v1beta1")
    _check_fails(k8s_copy, "policy/v1beta1/PodDisruptionBudget is not a kind Kubernetes")


def test_an_unknown_field_in_the_rayservice_fails(k8s_copy: Path) -> None:
    _edit(
        k8s_copy / "base/ray/rayservice.yaml",
        "    enableInTreeAutoscaling: false",
        "    enableInTreeAutoscaling: false\n    autoscale: true",
    )
    _check_fails(k8s_copy, "'autoscale' was unexpected")


def test_an_unknown_field_in_a_ray_pod_template_fails(k8s_copy: Path) -> None:
    _edit(
        k8s_copy / "base/ray/rayservice.yaml",
        "              imagePullPolicy: Always",
        "              imagePullPolicy: Always\n              imagePullPolicyy: Always",
    )
    _check_fails(k8s_copy, "imagePullPolicyy")


def test_an_unknown_kind_fails_not_warns(k8s_copy: Path) -> None:
    (k8s_copy / "base/torchserve/extra.yaml").write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n")
    _edit(k8s_copy / "base/torchserve/kustomization.yaml", "  - networkpolicy.yaml", "  - networkpolicy.yaml\n  - extra.yaml")
    _check_fails(k8s_copy, "example.com/v1/Widget is not a kind Kubernetes")


def test_a_container_port_that_the_config_does_not_listen_on_fails(k8s_copy: Path) -> None:
    _edit(k8s_copy / "base/torchserve/deployment.yaml", "containerPort: 8080", "containerPort: 8090")
    _check_fails(k8s_copy, "torchserve container ports")


def test_a_stale_generated_file_fails(k8s_copy: Path) -> None:
    _edit(k8s_copy / "base/torchserve/config.properties", f"max_request_size={frontend_limit_bytes(LIMIT)}", "max_request_size=1")
    _check_fails(k8s_copy, "config.properties is stale")


def test_exposing_the_management_port_fails(k8s_copy: Path) -> None:
    _edit(
        k8s_copy / "base/torchserve/service.yaml",
        "      port: 8082\n      targetPort: metrics",
        "      port: 8081\n      targetPort: 8081",
    )
    _check_fails(k8s_copy, "the Service exposes the management port")


def test_an_unknown_inferenceservice_field_fails(k8s_copy: Path) -> None:
    # KServe's full CRD lists the predictor's fields: a typo would be pruned by the API server, so it fails here.
    _edit(k8s_copy / "overlays/kserve/inferenceservice.yaml", "    minReplicas: 2", "    minReplica: 2")
    _check_fails(k8s_copy, "InferenceService/torchship: spec/predictor: Additional properties are not allowed ('minReplica' was")


def test_an_unknown_servingruntime_field_fails(k8s_copy: Path) -> None:
    _edit(k8s_copy / "overlays/kserve/servingruntime.yaml", "  multiModel: false", "  multiModel: false\n  multimodel: false")
    _check_fails(k8s_copy, "ServingRuntime/torchship-torchserve: spec: Additional properties are not allowed ('multimodel' was")


def test_monitoring_objects_are_checked_against_the_prometheus_operators_crds(k8s_copy: Path) -> None:
    # A PodMonitor endpoint's `scrapeInterval` is no field of the CRD (it is `interval`): Prometheus would scrape at its
    # default; a rule's unknown `severity` key beside `labels` would be dropped.
    _edit(k8s_copy / "overlays/monitoring/podmonitor.yaml", "      interval: 15s", "      scrapeInterval: 15s")
    _edit(
        k8s_copy / "overlays/monitoring/prometheusrule.yaml", "          for: 5m\n", "          for: 5m\n          severity: x\n"
    )
    _check_fails(
        k8s_copy, "PodMonitor/torchship: spec/podMetricsEndpoints/0: Additional properties are not allowed ('scrapeInterval'"
    )
    _check_fails(k8s_copy, "PrometheusRule/torchship: spec/groups/1/rules/0: Additional properties are not allowed ('severity'")


def test_a_rule_on_a_metric_torchship_does_not_export_fails(k8s_copy: Path) -> None:
    _edit(
        k8s_copy / "overlays/monitoring/prometheusrule.yaml", "rate(torchship_shed_total[5m])", "rate(torchship_sheds_total[5m])"
    )
    _check_fails(k8s_copy, "TorchshipShedding: asks for ['torchship_sheds_total'], which torchship does not export")


def test_a_rayservice_field_outside_the_official_crd_fails(k8s_copy: Path) -> None:
    # generateName is valid pod-template metadata for Kubernetes, but KubeRay's CRD lists only name, namespace,
    # labels, annotations and finalizers there: the operator would never see it.
    _edit(
        k8s_copy / "base/ray/rayservice.yaml",
        "        metadata:\n          labels:\n            app.kubernetes.io/name: torchship-ray\n        spec:",
        "        metadata:\n          generateName: torchship-ray-head-\n          labels:\n"
        "            app.kubernetes.io/name: torchship-ray\n        spec:",
    )
    _check_fails(
        k8s_copy,
        "RayService/torchship-ray: spec/rayClusterConfig/headGroupSpec/template/metadata: Additional properties are not "
        "allowed ('generateName' was unexpected)",
    )


def test_the_vendored_rayservice_crd_accepts_what_the_hand_written_subset_did_not_list() -> None:
    rayservice = next(o for o in render(K8S_DIR / "overlays" / "cpu") if o["kind"] == "RayService")
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = "ClusterIP"
    rayservice["spec"]["serviceUnhealthySecondThreshold"] = 900  # a KubeRay v1 field the old subset lacked
    assert validate_object(rayservice, K8S_VERSIONS[0]) == []


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        (
            "overlays/kserve/servingruntime.yaml",
            "  protocolVersions:\n    - v2",
            "  protocolVersions:\n    - v1\n    - grpc-v2",
            "ServingRuntime/torchship-torchserve: spec.protocolVersions ['v1', 'grpc-v2'] names no protocol the torchship "
            "pod answers",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            "    - v2\n",
            "    - v2\n    - v1\n",
            "ServingRuntime/torchship-torchserve: spec.protocolVersions names 'v1', which the torchship pod does not answer",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            "    - name: torchship-mar",
            "    - name: pytorch",
            "ServingRuntime/torchship-torchserve: spec.supportedModelFormats [('pytorch', '1')] lacks",
        ),
        (
            "overlays/kserve/inferenceservice.yaml",
            "      protocolVersion: v2\n",
            "",
            "InferenceService/torchship: spec.predictor.model.protocolVersion is unset: KServe assumes v1",
        ),
        (
            "overlays/kserve/inferenceservice.yaml",
            '        version: "1"',
            '        version: "2"',
            "InferenceService/torchship: spec.predictor.model.modelFormat {'name': 'torchship-mar', 'version': '2'} is not "
            "among torchship-torchserve's supportedModelFormats",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            "        - --ncs\n",
            "",
            "ServingRuntime/torchship-torchserve container kserve-container: args",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            "containerPort: 8080",
            "containerPort: 8085",
            "ServingRuntime/torchship-torchserve container kserve-container ports",
        ),
    ],
    ids=["no-supported-protocol", "unsupported-protocol", "model-format", "isvc-protocol", "isvc-format", "command", "port"],
)
def test_a_kserve_runtime_the_pod_cannot_honour_fails(k8s_copy: Path, path: str, old: str, new: str, expected: str) -> None:
    _edit(k8s_copy / path, old, new)
    _check_fails(k8s_copy, expected)


ENV_LINES = '            - name: TORCHSHIP_MAX_REQUEST_BYTES\n              value: "67108864"\n'
RUNTIME_ENV_LINES = '        - name: TORCHSHIP_MAX_REQUEST_BYTES\n          value: "67108864"\n'


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        (
            "base/torchserve/deployment.yaml",
            ENV_LINES,
            "",
            f"Deployment/torchserve container torchserve: env {MAX_REQUEST_BYTES_ENV} is not set",
        ),
        (
            "base/torchserve/deployment.yaml",
            ENV_LINES,
            ENV_LINES.replace("67108864", "1048576"),
            f"Deployment/torchserve container torchserve: env {MAX_REQUEST_BYTES_ENV} is '1048576', not {LIMIT}",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            RUNTIME_ENV_LINES,
            "",
            f"ServingRuntime/torchship-torchserve container kserve-container: env {MAX_REQUEST_BYTES_ENV} is not set",
        ),
        (
            "base/torchserve/config.properties",
            f"max_request_size={frontend_limit_bytes(LIMIT)}",
            f"max_request_size={LIMIT}",
            f"max_request_size is {LIMIT}, not {frontend_limit_bytes(LIMIT)}: TorchServe's own cut must sit above",
        ),
    ],
    ids=["deployment-missing", "deployment-wrong", "runtime-missing", "frontend-cut"],
)
def test_a_pod_without_the_handlers_body_limit_fails(k8s_copy: Path, path: str, old: str, new: str, expected: str) -> None:
    _edit(k8s_copy / path, old, new)
    steps = {s.name: s for s in check(k8s_copy, lint=False, versions=NEWEST)}
    assert not steps["body limit"].passed
    assert expected in steps["body limit"].detail, steps["body limit"].detail


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        (
            "base/torchserve/deployment.yaml",
            "command: [python, -m, torchship.engines.torchserve.drain,",
            "command: [python, -m, torchship.engines.torchserve.probe,",
            "Deployment/torchserve container torchserve: no preStop hook runs `python -m torchship.engines.torchserve.drain`",
        ),
        (
            "base/torchserve/deployment.yaml",
            "--model-store, /opt/torchship/model_store, --window-s",
            "--model-store, /opt/torchship/other_store, --window-s",
            "the preStop drain's --model-store is /opt/torchship/other_store, TorchServe serves /opt/torchship/model_store",
        ),
        (
            "base/torchserve/deployment.yaml",
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 30",
            "Deployment/torchserve: terminationGracePeriodSeconds 30 is shorter than the drain's window 5 s",
        ),
        (
            "overlays/kserve/inferenceservice.yaml",
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 20",
            "terminationGracePeriodSeconds 20 is shorter than the drain's window 5 s + flush 20 s + stop 10 s = 35 s",
        ),
        (
            "overlays/kserve/servingruntime.yaml",
            "- name: TORCHSHIP_DRAIN_FILE",
            "- name: TORCHSHIP_DRAIN_FILE_UNUSED",
            "ServingRuntime/torchship-torchserve container kserve-container: env TORCHSHIP_DRAIN_FILE is not set",
        ),
    ],
    ids=["deployment-no-drain", "deployment-other-store", "deployment-short-grace", "kserve-short-grace", "runtime-no-file"],
)
def test_a_pod_that_would_drop_requests_when_it_stops_fails(k8s_copy: Path, path: str, old: str, new: str, expected: str) -> None:
    _edit(k8s_copy / path, old, new)
    steps = {s.name: s for s in check(k8s_copy, lint=False, versions=NEWEST)}
    assert not steps["graceful drain"].passed
    assert expected in steps["graceful drain"].detail, steps["graceful drain"].detail


def test_every_torchserve_pod_sets_the_handlers_body_limit_like_the_local_launcher() -> None:
    for overlay in ("cpu", "gpu", "staging", "candidate", "kserve", "kserve-gpu"):
        objs = render(K8S_DIR / "overlays" / overlay)
        pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"]
        pods += [o["spec"] for o in objs if o["kind"] == "ServingRuntime"]
        containers = [c for pod in pods for c in pod["containers"] if c["name"] in ("torchserve", kserve.CONTAINER_NAME)]
        assert containers, overlay
        for c in containers:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env[MAX_REQUEST_BYTES_ENV] == str(LIMIT), (overlay, c["name"])


def test_every_overlay_has_the_security_settings_the_issue_asks_for() -> None:
    for overlay in ("cpu", "gpu", "staging"):
        objs = render(K8S_DIR / "overlays" / overlay)
        kinds = {o["kind"] for o in objs}
        assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "RayService"} <= kinds
        dep = next(o for o in objs if o["kind"] == "Deployment")
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        c = pod["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        svc = next(o for o in objs if o["kind"] == "Service")
        assert svc["spec"]["type"] == "ClusterIP" and {p["port"] for p in svc["spec"]["ports"]} == {8080, 8082}
        if overlay == "gpu":
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
            ray = next(o for o in objs if o["kind"] == "RayService")
            groups = {g["groupName"]: g for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
            assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            config = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("torchserve-config"))
            assert "number_of_gpu=1" in config["data"]["config.properties"]


def test_the_cluster_serve_config_is_the_local_one_with_image_paths() -> None:
    local = yaml.safe_load((REPO / "configs/ray-serve.yaml").read_text())
    cluster = serve_config()
    for app in cluster["applications"]:
        app["args"].pop("cache_dir")
        app["args"]["model_store"] = "model_store"
        # The image has no configs/: the body limit is written in, from configs/config.properties.
        assert app["args"].pop("max_request_bytes") == default_body_limit_bytes()
    assert cluster == local


def test_validation_reports_each_version() -> None:
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "p"}, "spec": {"minAvailable": 1}}
    for v in K8S_VERSIONS:
        assert validate_object(pdb, v) == []
        assert validate_object({**pdb, "spec": {"minAvailabel": 1}}, v)


def test_set_image_changes_only_matching_repositories() -> None:
    objs = render(K8S_DIR / "overlays" / "cpu")
    # TorchServe and its metrics exporter run the same image: a rollout moves both, and no Ray container.
    assert set_image(objs, "torchship/torchserve@sha256:" + "a" * 64) == 2
    images = sorted(
        {c["image"] for o in objs for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])}
    )
    assert images == ["torchship/torchserve@sha256:" + "a" * 64]
    assert image_repository("registry:5000/torchship/ray:1.0") == "registry:5000/torchship/ray"


def test_the_kserve_overlays_carry_the_pods_security_settings_and_token() -> None:
    for overlay in ("kserve", "kserve-gpu"):
        objs = render(K8S_DIR / "overlays" / overlay)
        kinds = {o["kind"] for o in objs}
        assert {"ServingRuntime", "InferenceService", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount"} <= kinds
        runtime = next(o for o in objs if o["kind"] == "ServingRuntime")
        isvc = next(o for o in objs if o["kind"] == "InferenceService")
        predictor = isvc["spec"]["predictor"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        assert predictor["securityContext"]["runAsNonRoot"] is True
        assert predictor["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert predictor["automountServiceAccountToken"] is False
        assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
        assert predictor["model"]["storageUri"].startswith("pvc://")  # mounted directly: no download init container
        c = runtime["spec"]["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {p["containerPort"] for p in c["ports"]} == {8080, 8082}  # never management (8081)
        env = {e["name"]: e.get("value") for e in c["env"]}
        token = next(v for v in runtime["spec"]["volumes"] if v["name"] == "token")
        assert token["secret"]["secretName"] == "torchship-inference-token"
        assert env["TORCHSHIP_INFERENCE_TOKEN_FILE"].startswith(
            next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "token")
        )
        assert c["args"] == kserve.RUNTIME_ARGS and "TS_SERVICE_ENVELOPE" not in env
        if overlay == "kserve-gpu":
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert c["image"].endswith("-gpu") and runtime["spec"]["nodeSelector"]
            assert predictor["model"]["storageUri"] != "pvc://torchship-kserve-store/"
        else:
            assert c["image"].endswith("-cpu") and "nvidia.com/gpu" not in c["resources"]["limits"]


def test_a_ray_container_without_torchships_serve_settings_fails(k8s_copy: Path) -> None:
    """A RayService worker running Ray's stock Serve settings would serve the slow design (docs/benchmarks.md)."""
    text = (k8s_copy / "base/ray/rayservice.yaml").read_text()
    worker = text.index("- name: ray-worker")
    at = text.index("- name: RAY_SERVE_ENABLE_HA_PROXY", worker)
    edited = text[:at] + text[at:].replace('value: "1"', 'value: "0"', 1)
    (k8s_copy / "base/ray/rayservice.yaml").write_text(edited)
    steps = {s.name: s for s in check(k8s_copy, lint=False, versions=NEWEST)}
    assert steps["ray serve settings"].passed is False
    assert "container ray-worker: RAY_SERVE_ENABLE_HA_PROXY is '0', not '1'" in steps["ray serve settings"].detail
