"""The vendored CRD schemas (deploy/k8s/schemas) and how deploy/crds.py makes them strict."""

from __future__ import annotations

import copy
import hashlib
import json

import jsonschema
import pytest

from torchship.deploy.crds import CRD_SCHEMAS, PRESERVE, SOURCES_FILE, crd_problems, extract_schema, strict_schema
from torchship.deploy.kube import SCHEMA_DIR
from torchship.errors import DeployError

CRD_LIKE = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "replicas": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "config": {"type": "object", PRESERVE: True},
                "template": {"type": "object", "properties": {"metadata": {"type": "object"}}},
                "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "when": {"type": "string", "nullable": True},
                "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            },
        },
    },
}


def _errors(instance: object) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(strict_schema(CRD_LIKE)).iter_errors(instance)]


def test_objects_refuse_fields_their_schema_does_not_list() -> None:
    assert _errors({"spec": {"replicas": 1, "replica": 1}}) == [
        "Additional properties are not allowed ('replica' was unexpected)"
    ]
    assert _errors({"spec": {"items": [{"name": "a", "nmae": "b"}]}})
    assert _errors({"spec": {"replicas": 2, "items": [{"name": "a"}], "port": "http"}}) == []


def test_maps_preserved_objects_nullable_and_the_top_level_metadata_stay_as_the_crd_says() -> None:
    assert _errors({"spec": {"labels": {"any": "key"}, "config": {"anything": {"goes": 1}}, "when": None}}) == []
    assert _errors({"spec": {"labels": {"a": 1}}})  # a map's values keep their type
    assert _errors({"metadata": {"name": "x", "labels": {}}}) == []  # ObjectMeta is checked with Kubernetes' schema
    # A nested metadata without fields is pruned by the API server: anything in it is refused.
    assert _errors({"spec": {"template": {"metadata": {"labels": {}}}}})


def test_strict_schema_leaves_its_input_alone() -> None:
    before = copy.deepcopy(CRD_LIKE)
    strict_schema(CRD_LIKE)
    assert before == CRD_LIKE


def test_every_vendored_schema_is_the_one_sources_json_records() -> None:
    sources = json.loads((SCHEMA_DIR / SOURCES_FILE).read_text())
    assert set(CRD_SCHEMAS.values()) == set(sources)
    for filename, source in sources.items():
        data = (SCHEMA_DIR / filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == source["sha256"], filename
        assert source["license"] == "Apache-2.0" and len(source["commit"]) == 40 and source["tag"]
        schema = json.loads(data)
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"]), filename
    for (api_version, kind), filename in CRD_SCHEMAS.items():
        assert f"{api_version} {kind}" in sources[filename]["kinds"]


def test_the_official_schemas_name_the_object_path_of_a_problem() -> None:
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "m"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "torchship-mar"}, "storageURI": "pvc://x/"}}},
    }
    path = SCHEMA_DIR / CRD_SCHEMAS[("serving.kserve.io/v1beta1", "InferenceService")]
    assert crd_problems(isvc, path) == [
        "spec/predictor/model: Additional properties are not allowed ('storageURI' was unexpected)"
    ]
    isvc["spec"]["predictor"]["model"]["storageUri"] = isvc["spec"]["predictor"]["model"].pop("storageURI")
    assert crd_problems(isvc, path) == []


def test_extract_schema_takes_the_named_version() -> None:
    crd = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  versions:
    - name: v1
      schema: {openAPIV3Schema: {type: object, description: one}}
    - name: v2
      schema: {openAPIV3Schema: {type: object, description: two}}
"""
    assert extract_schema(crd, "v2") == {"type": "object", "description": "two"}
    with pytest.raises(DeployError, match=r"has no version 'v3' \(it has \['v1', 'v2'\]\)"):
        extract_schema(crd, "v3")
    with pytest.raises(DeployError, match="not a CustomResourceDefinition"):
        extract_schema("kind: ConfigMap\n", "v1")
