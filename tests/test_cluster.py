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


def test_torch_and_torchvision_are_pinned_with_one_cuda_build_from_its_index(raw: dict) -> None:
    """Pickled models and NCCL cross nodes: one exact torch everywhere, inside pyproject's ranges."""
    cmds = "\n".join(raw["setup_commands"])
    torch_pin = re.findall(r'"torch==(\d+)\.(\d+)\.(\d+)\+(cu\d+)"', cmds)
    vision_pin = re.findall(r'"torchvision==(\d+)\.(\d+)\.(\d+)\+(cu\d+)"', cmds)
    assert len(torch_pin) == 1 and len(vision_pin) == 1, cmds
    (t_major, t_minor, _, t_cuda), (v_major, v_minor, _, v_cuda) = torch_pin[0], vision_pin[0]
    assert (int(t_major), int(t_minor)) >= (2, 4) and (int(v_major), int(v_minor)) >= (0, 19)  # pyproject's ranges
    assert int(v_minor) == int(t_minor) + 15 and v_major == "0"  # the torchvision release built for that torch
    assert t_cuda == v_cuda
    assert f"--index-url https://download.pytorch.org/whl/{t_cuda}" in cmds  # the index of that CUDA build
    assert not re.search(r'"torch(vision)?>=', cmds)  # no unpinned install beside the pins


def test_every_node_installs_the_nfs_client_before_mounting_the_shared_storage(raw: dict) -> None:
    cmds = raw["initialization_commands"]
    install = next(i for i, c in enumerate(cmds) if "apt-get install" in c and "nfs-common" in c)
    mount = next(i for i, c in enumerate(cmds) if "mount -t nfs4" in c)
    assert install < mount and "/mnt/cluster_storage" in cmds[mount]
    assert "2049" in (ROOT / "cluster.yaml").read_text()  # the security-group rule the mount needs is documented


def test_a_multi_gpu_node_type_beside_the_one_gpu_type(raw: dict) -> None:
    cfg = _prepared(raw)
    gpus = {"g5.2xlarge": 1, "g5.12xlarge": 4}  # A10G per instance (AWS detects them; resources stay {})
    types = {t["node_config"]["InstanceType"]: t for t in cfg["available_node_types"].values()}
    assert set(gpus) <= set(types)
    for it in gpus:
        assert types[it]["min_workers"] == 0 and types[it]["max_workers"] >= 1


def test_every_node_starts_ray_with_the_shared_storage_declared(raw: dict) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in raw[key] if "ray start" in c]
        env, _, _ = start.partition("ray start")  # set before `ray start`, so every Ray process inherits it
        assert "export IDTL_SHARED_STORAGE=/mnt/cluster_storage" in env, start
        assert "TORCH_HOME=/mnt/cluster_storage/" in env, start


def test_validation_catches_a_typo_in_a_node_type(raw: dict) -> None:
    """The check is real: the schema is strict inside node types."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = bad["available_node_types"]["gpu_worker"].pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        _prepared(bad)


def test_rayignore_keeps_the_venv_and_outputs_out_of_job_uploads() -> None:
    lines = {ln.strip() for ln in (ROOT / ".rayignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".venv/", "runs/", "results/", "data/"} <= lines
