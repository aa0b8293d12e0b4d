"""cluster.yaml, validated offline with Ray's own launcher checks (ray-2.60-notes section 4).

``prepare_config`` merges the AWS defaults and fills per-type max_workers; ``validate_config`` runs the
launcher's JSON schema and its head / min / max checks. Neither needs boto3 or a network. Both are
private Ray APIs, which is one more reason to pin Ray to the version this test runs with.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


def test_cluster_yaml_passes_ray_launcher_validation(raw: dict) -> None:
    cfg = _prepared(raw)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_head_takes_no_work_and_a_gpu_worker_type_scales_from_zero(raw: dict) -> None:
    cfg = _prepared(raw)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [name for name, t in types.items()
           if name != cfg["head_node_type"] and re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]  # fmt: skip
    assert gpu, "no worker type on a GPU instance (g*/p* on AWS)"
    for name in gpu:
        assert types[name]["min_workers"] == 0
        assert types[name]["max_workers"] >= 1


def test_setup_pins_the_ray_version_of_this_environment_and_installs_the_project(raw: dict) -> None:
    cmds = "\n".join(raw["setup_commands"])
    pins = re.findall(r"ray\[[^\]]*\]==([0-9][0-9.]*)", cmds)
    assert pins == [ray.__version__]
    assert "torch" in cmds and "torchvision" in cmds
    assert "pip install -e ." in cmds
    assert "." in raw["file_mounts"].values()  # the working tree travels to every node


def test_validation_catches_a_typo_in_a_node_type(raw: dict) -> None:
    """The check is real: the schema is strict inside node types."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = bad["available_node_types"]["gpu_worker"].pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        _prepared(bad)


def test_rayignore_keeps_the_venv_and_outputs_out_of_job_uploads() -> None:
    lines = {ln.strip() for ln in (ROOT / ".rayignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".venv/", "runs/", "results/", "data/"} <= lines
