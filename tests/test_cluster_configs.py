"""cluster/: the Ray Serve configs validate against Ray Serve's own schema and moeserve's
application arguments; the `ray up` config against Ray's autoscaler schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moeserve.entrypoints.ray_serve import ServeArgs

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
pytest.importorskip("ray.serve")


@pytest.mark.parametrize("name", ["local.yaml", "serve.yaml"])
def test_serve_configs_validate(name):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((CLUSTER / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "moeserve.entrypoints.ray_serve:build_app"
    args = ServeArgs.from_dict(app.args)  # every arg known, engine settings included
    assert (args.num_replicas is None) != (args.autoscaling_config is None)
    if name == "local.yaml":
        assert (CLUSTER.parent / args.model / "config.json").is_file()  # the embedded model, from the repo root
        assert args.num_replicas == 2


def test_gpu_cluster_config_validates_against_rays_autoscaler_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] == config["max_workers"] and config["head_node_type"] in config["available_node_types"]
