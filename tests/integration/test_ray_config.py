"""The Ray Serve config YAML is valid for Ray's own schema and names deployments the app really builds."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from torchship.engines.ray.app import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ray-serve.yaml"


def test_serve_config_matches_rays_schema() -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = schema.applications
    assert application.import_path == "torchship.engines.ray.app:app"
    assert application.route_prefix == "/"


def test_config_deployments_exist_in_the_built_app(archives: dict[str, object], tmp_path: Path) -> None:
    store = next(iter(archives.values())).mar.parent  # type: ignore[attr-defined]
    config = yaml.safe_load(CONFIG.read_text())
    application = config["applications"][0]
    built = app({**application["args"], "model_store": str(store), "cache_dir": str(tmp_path)})
    names = {built._bound_deployment.name}
    names |= set(built._bound_deployment.init_args[0])  # the endpoint deployments handed to the ingress
    for d in application["deployments"]:
        assert d["name"] in names, d["name"]
