"""The custom resources torchship writes (KubeRay's RayService, KServe's InferenceService and ServingRuntime, the
Prometheus Operator's PodMonitor and PrometheusRule),
checked against the operators' own CRD schemas, vendored in deploy/k8s/schemas/ (sources.json says from where).

A CRD's openAPIV3Schema is turned into a strict JSON Schema once per process: an object rejects fields its schema
does not list, as the API server does with kubectl's strict field validation, except where the CRD itself says
`x-kubernetes-preserve-unknown-fields`. `python -m torchship.deploy.crds CRD.yaml VERSION OUT.json` vendors one schema.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from torchship.errors import DeployError

if TYPE_CHECKING:
    import jsonschema

#: Custom resources and the vendored schema that describes each; any other kind must be a built-in Kubernetes kind.
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices_v1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices_v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes_v1alpha1.json",
    # KServe's ClusterServingRuntime CRD has the very same v1alpha1 schema (sources.json).
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "serving.kserve.io_servingruntimes_v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules_v1.json",
}
#: Where each vendored schema came from (repository, path, tag, commit, sha256 of the vendored file, licence).
SOURCES_FILE = "sources.json"
PRESERVE = "x-kubernetes-preserve-unknown-fields"


def strict_schema(node: Any, *, root: bool = True) -> Any:
    """An openAPIV3Schema as a JSON Schema that refuses unknown fields (a new tree; the input is left alone).

    - An object schema without `additionalProperties` gets `additionalProperties: false`: the API server would prune
      such a field (or refuse it under strict field validation), so the manifest does not mean what it says.
    - `x-kubernetes-preserve-unknown-fields: true` keeps an object open, as the CRD asks.
    - `nullable: true` admits null.
    - The top-level `metadata` stays open here: it is a Kubernetes ObjectMeta, which the caller checks with the
      Kubernetes schema (a CRD lists no fields for it).
    CEL rules (`x-kubernetes-validations`) are not evaluated; the API server runs them.
    """
    if isinstance(node, list):
        return [strict_schema(item, root=False) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {
                name: (sub if root and name == "metadata" else strict_schema(sub, root=False)) for name, sub in value.items()
            }
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = strict_schema(value, root=False)
        else:
            out[key] = value
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in node and not node.get(PRESERVE):
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def validator(path: Path) -> jsonschema.Draft202012Validator:
    """The strict validator for one vendored schema, built once per process (check validates every object on every
    Kubernetes version)."""
    import jsonschema  # the deploy extra: `pip install torchship[deploy]`

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeployError(f"cannot read the CRD schema {path}: {exc}") from None
    return jsonschema.Draft202012Validator(strict_schema(schema))


def where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


def crd_problems(obj: dict[str, Any], schema_path: Path) -> list[str]:
    """Every way `obj` breaks its CRD's schema, as `path: message`; empty when it conforms."""
    errors = sorted(validator(schema_path).iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{where(e)}: {e.message}" for e in errors]


def extract_schema(crd_text: str, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of one served version of a CustomResourceDefinition (YAML text), as it stands."""
    crd = yaml.safe_load(crd_text)
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise DeployError("not a CustomResourceDefinition")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    served = [v["name"] for v in crd["spec"]["versions"]]
    raise DeployError(f"{crd['metadata']['name']} has no version {version!r} (it has {served})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchship.deploy.crds", description="vendor one CRD version's schema as compact JSON"
    )
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition YAML (from the operator's repository)")
    parser.add_argument("version", help="the API version to take, e.g. v1 or v1beta1")
    parser.add_argument("out", type=Path, help="the JSON file to write under deploy/k8s/schemas/")
    args = parser.parse_args(argv)
    schema = extract_schema(args.crd.read_text(encoding="utf-8"), args.version)
    args.out.write_text(json.dumps(schema, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out}; record its source, tag, commit and sha256 in {SOURCES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
