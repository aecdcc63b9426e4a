"""deploy check's monitoring checks on the shipped manifests, and the mistakes each one exists to catch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from torchship.deploy.kube import K8S_DIR
from torchship.deploy.monitoring import exported_names, exporters, monitoring, scraped, unknown_metrics

MONITORING = K8S_DIR / "overlays" / "monitoring"


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return doc


def _monitors() -> list[dict[str, Any]]:
    dashboard = (MONITORING / "torchship-dashboard.json").read_text(encoding="utf-8")
    configmap = {
        "kind": "ConfigMap",
        "metadata": {"name": "torchship-dashboard"},
        "data": {"torchship-dashboard.json": dashboard},
    }
    return [_load(MONITORING / "podmonitor.yaml"), _load(MONITORING / "prometheusrule.yaml"), configmap]


def _serving() -> list[dict[str, Any]]:
    return [_load(K8S_DIR / "base" / "torchserve" / "deployment.yaml"), _load(K8S_DIR / "base" / "ray" / "rayservice.yaml")]


def test_the_shipped_rules_dashboard_and_pods_hold_together() -> None:
    assert monitoring(_monitors(), _serving()) == []
    assert "torchship_stage_seconds_bucket" in exported_names() and "torchship_requests_total" in exported_names()


def test_a_rule_or_panel_asking_for_a_metric_nobody_exports_is_named() -> None:
    monitors = _monitors()
    rule = monitors[1]["spec"]["groups"][0]["rules"][0]
    rule["expr"] = rule["expr"].replace("torchship_parity_ok", "torchship_parity_okay")
    dashboard = json.loads(monitors[2]["data"]["torchship-dashboard.json"])
    dashboard["panels"][3]["targets"][0]["expr"] = "sum(rate(torchship_request_total[1m]))"
    monitors[2]["data"]["torchship-dashboard.json"] = json.dumps(dashboard)
    problems = unknown_metrics(monitors)
    assert len(problems) == 2
    assert "TorchshipParityLost: asks for ['torchship_parity_okay']" in problems[0]
    assert "asks for ['torchship_request_total']" in problems[1]


def test_a_pod_whose_exporter_reads_another_folder_is_named() -> None:
    serving = _serving()
    broken = copy.deepcopy(serving)
    exporter = next(c for c in broken[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "torchship-metrics")
    exporter["args"][exporter["args"].index("--dir") + 1] = "/elsewhere"
    problems = exporters(broken)
    assert problems and "torchserve writes metrics to /var/run/torchship-metrics" in problems[0]
    gone = copy.deepcopy(serving)
    worker = gone[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"] = [c for c in worker["containers"] if c["name"] != "torchship-metrics"]
    assert exporters(gone) == ["RayService/torchship-ray cpu: sets TORCHSHIP_METRICS_DIR but has no torchship-metrics container"]


def test_a_pod_no_podmonitor_selects_is_named() -> None:
    monitors = _monitors()
    monitors[0]["spec"]["selector"]["matchExpressions"][0]["values"] = ["torchserve"]
    assert scraped(monitors, _serving()) == [
        "RayService/torchship-ray cpu: no PodMonitor selects its labels {'app.kubernetes.io/name': 'torchship-ray'} and "
        "scrapes port 'exporter'"
    ]
