"""`deploy check`'s monitoring checks: the alert rules and the dashboard ask only for metrics torchship exports, and
the PodMonitor finds an exporter in every serving pod that writes metrics (the Prometheus Operator's CRD schemas check
the objects' fields; this checks what they mean)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from torchship.handlers.metrics import METRICS
from torchship.handlers.names import METRICS_DIR_ENV

#: The exporter container and its port name in every pod that writes metrics (deploy/k8s/base/*).
EXPORTER_CONTAINER = "torchship-metrics"
EXPORTER_PORT = "exporter"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_METRIC = re.compile(r"\btorchship_[a-z_]+")


def exported_names() -> set[str]:
    """Every series name torchship's exporter writes (a histogram's bucket, sum and count)."""
    names: set[str] = set()
    for name, (kind, _help) in METRICS.items():
        names |= {name + s for s in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
    return names


def queries(objs: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard panel target among objs."""
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "PrometheusRule":
            for group in obj["spec"].get("groups", []):
                for rule in group.get("rules", []):
                    yield f"{name} {rule.get('alert') or rule.get('record')}", str(rule["expr"])
        elif obj["kind"] == "ConfigMap":
            for key, text in (obj.get("data") or {}).items():
                if key.endswith(".json"):
                    for panel in json.loads(text).get("panels", []):
                        for target in panel.get("targets", []):
                            yield f"{name} {key} panel {panel.get('title')!r}", str(target.get("expr", ""))


def unknown_metrics(objs: list[dict[str, Any]]) -> list[str]:
    """Each query that names a torchship metric the exporter does not write (a renamed metric, a typo)."""
    known = exported_names()
    problems = []
    for where, expr in queries(objs):
        missing = sorted(set(_METRIC.findall(expr)) - known)
        if missing:
            problems.append(f"{where}: asks for {missing}, which torchship does not export")
        if not _METRIC.search(expr):
            problems.append(f"{where}: names no torchship metric: {expr!r}")
    return problems


def _pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "Deployment":
        yield name, obj["spec"]["template"]
    elif obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        yield f"{name} head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} {group['groupName']}", group["template"]


def _env(container: dict[str, Any], name: str) -> str | None:
    return next((str(e.get("value")) for e in container.get("env") or [] if e.get("name") == name), None)


def exporters(serving: list[dict[str, Any]]) -> list[str]:
    """Every pod template whose containers write metrics (METRICS_DIR_ENV) has the exporter beside them, reading
    the same folder from the same volume, on port EXPORTER_PORT; returns the problems."""
    problems = []
    for obj in serving:
        for where, template in _pod_templates(obj):
            containers = template["spec"].get("containers", [])
            writers = [(c, d) for c in containers if (d := _env(c, METRICS_DIR_ENV))]
            if not writers:
                continue
            exporter = next((c for c in containers if c["name"] == EXPORTER_CONTAINER), None)
            if exporter is None:
                problems.append(f"{where}: sets {METRICS_DIR_ENV} but has no {EXPORTER_CONTAINER} container")
                continue
            args = [*exporter.get("command", []), *exporter.get("args", [])]
            folder = args[args.index("--dir") + 1] if "--dir" in args[:-1] else None
            if args[:2] != ["torchship", "metrics"] or folder is None:
                problems.append(f"{where}: {EXPORTER_CONTAINER} must run `torchship metrics --dir DIR`, not {args}")
                continue
            if EXPORTER_PORT not in {p.get("name") for p in exporter.get("ports", [])}:
                problems.append(f"{where}: {EXPORTER_CONTAINER} exposes no port named {EXPORTER_PORT!r}")
            volume = {m["mountPath"].rstrip("/"): m["name"] for m in exporter.get("volumeMounts", [])}.get(folder)
            for container, wrote in writers:
                mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
                if wrote != folder or volume is None or mounts.get(folder) != volume:
                    problems.append(
                        f"{where}: {container['name']} writes metrics to {wrote}, which {EXPORTER_CONTAINER} does not read "
                        f"from the same volume (it reads {folder})"
                    )
    return problems


def scraped(monitors: list[dict[str, Any]], serving: list[dict[str, Any]]) -> list[str]:
    """Every pod template with an exporter is selected by a PodMonitor that scrapes EXPORTER_PORT."""
    problems = []
    pod_monitors = [m for m in monitors if m["kind"] == "PodMonitor"]
    for obj in serving:
        for where, template in _pod_templates(obj):
            if not any(c["name"] == EXPORTER_CONTAINER for c in template["spec"].get("containers", [])):
                continue
            labels = template.get("metadata", {}).get("labels", {})
            if not any(
                _selects(m["spec"].get("selector", {}), labels)
                and EXPORTER_PORT in {e.get("port") for e in m["spec"].get("podMetricsEndpoints", [])}
                for m in pod_monitors
            ):
                problems.append(f"{where}: no PodMonitor selects its labels {labels} and scrapes port {EXPORTER_PORT!r}")
    return problems


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In / NotIn / Exists / DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        held = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }
        if not held.get(op, False):
            return False
    return True


def monitoring(monitors: list[dict[str, Any]], serving: list[dict[str, Any]]) -> list[str]:
    """All of the above for the monitoring overlay against a serving overlay's objects."""
    return unknown_metrics(monitors) + exporters(serving) + scraped(monitors, serving)
