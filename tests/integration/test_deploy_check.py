"""`torchship deploy check` on the real manifests, and on copies broken in the ways users break them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from deploy.kube import K8S_DIR, K8S_VERSIONS, check, image_repository, render, serve_config, validate_object
from deploy.rollout import set_image
from engines.base import default_body_limit_bytes
from tests.helpers import REPO, run_cli


def test_deploy_check_passes_on_the_repository() -> None:
    proc = run_cli("deploy", "check", timeout_s=900)
    assert "checks passed" in proc.stdout
    for step in ("validate cpu", "validate gpu", "validate staging", "validate candidate", "ports and probes", "yamllint",
                 "hadolint", "checkov"):  # fmt: skip
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


def _check_fails(k8s_dir: Path, expected: str) -> None:
    steps = check(k8s_dir, lint=False)
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
    _edit(k8s_copy / "base/torchserve/config.properties", "max_request_size=67108864", "max_request_size=1")
    _check_fails(k8s_copy, "config.properties is stale")


def test_exposing_the_management_port_fails(k8s_copy: Path) -> None:
    _edit(
        k8s_copy / "base/torchserve/service.yaml",
        "      port: 8082\n      targetPort: metrics",
        "      port: 8081\n      targetPort: 8081",
    )
    _check_fails(k8s_copy, "the Service exposes the management port")


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
    assert set_image(objs, "torchship/torchserve@sha256:" + "a" * 64) == 1
    images = sorted(
        {c["image"] for o in objs for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])}
    )
    assert "torchship/torchserve@sha256:" + "a" * 64 in images
    assert image_repository("registry:5000/torchship/ray:1.0") == "registry:5000/torchship/ray"
