"""cluster.yaml, validated offline with Ray's own launcher checks (ray-2.60-notes section 4).

``prepare_config`` merges the AWS defaults and fills per-type max_workers; ``validate_config`` runs the
launcher's JSON schema and its head / min / max checks. Neither needs boto3 or a network. Both are
private Ray APIs, which is one more reason to pin Ray to the version this test runs with.
"""

from __future__ import annotations

import copy
import fnmatch
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


def _start_env(raw: dict, key: str) -> dict[str, str]:
    """The variables exported before `ray start` in a start command (every Ray process inherits them)."""
    [start] = [c for c in raw[key] if "ray start" in c]
    env, _, _ = start.partition("ray start")
    exports = re.findall(r"export ([^;]+);", env)
    assert exports, start
    return dict(kv.split("=", 1) for line in exports for kv in line.split())


def test_every_node_starts_ray_with_the_shared_storage_declared(raw: dict) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = _start_env(raw, key)
        assert env["IDTL_SHARED_STORAGE"] == "/mnt/cluster_storage", env
        assert env["TORCH_HOME"].startswith("/mnt/cluster_storage/"), env
        assert env["IDTL_CACHE_DIR"].startswith("/mnt/cluster_storage/"), env
    # `ray job stop` kills the job 3 s after SIGTERM by default, before Ray Data / Ray Train wind down
    assert int(_start_env(raw, "head_start_ray_commands")["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


def test_a_dataset_given_by_name_is_prepared_on_shared_storage(raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a node's environment, where `--dataset cifar100` (and the jobs' npz: smoke files) are prepared
    counts as shared: without IDTL_CACHE_DIR it was ~/.cache on each node, and every job was refused."""
    from idtl_ray.resources import dataset_location, is_shared

    for name, value in _start_env(raw, "head_start_ray_commands").items():
        monkeypatch.setenv(name, value)
    for dataset in ("cifar100", "npz:/mnt/cluster_storage/results/smoke/x.npz"):
        _, where = dataset_location(dataset)
        assert is_shared(where), (dataset, where)


def test_validation_catches_a_typo_in_a_node_type(raw: dict) -> None:
    """The check is real: the schema is strict inside node types."""
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = bad["available_node_types"]["gpu_worker"].pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        _prepared(bad)


def _package_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "idtl_ray").rglob("*.py") if "__pycache__" not in p.parts}


def test_a_job_upload_holds_the_whole_package_but_not_the_venv_or_outputs(tmp_path: Path) -> None:
    """Built with Ray's own packager (what `ray job submit --working-dir .` uploads, .gitignore and
    .rayignore applied): an unanchored "data/" in .rayignore dropped the package idtl_ray/data/."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    create_package(str(ROOT), tmp_path / "upload.zip", include_gitignore=True)
    names = set(zipfile.ZipFile(tmp_path / "upload.zip").namelist())
    assert _package_files() <= names, sorted(_package_files() - names)
    assert "jobs/table5.py" in names and "pyproject.toml" in names
    assert not any(n.split("/")[0] in {".venv", "runs", "results", "data", ".git"} for n in names)


def _rsync_excludes(pattern: str, path: str) -> bool:
    """Whether rsync's ``--exclude pattern`` drops ``path`` (relative to the transfer root) or a folder above
    it: a leading "/" anchors the pattern at the root, "**/" and a bare name match at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if pattern.startswith("/"):
        return any(fnmatch.fnmatch(p, pattern[1:]) for p in prefixes)
    name = pattern[3:] if pattern.startswith("**/") else pattern
    return any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], name) for p in prefixes)


def test_the_node_sync_keeps_the_whole_package(raw: dict) -> None:
    """cluster.yaml's rsync_exclude: "**/data" also dropped idtl_ray/data/, so `pip install -e .` failed on
    every node; the top-level data and output folders stay out."""
    excludes = raw["rsync_exclude"]
    dropped = {f for f in _package_files() | {"pyproject.toml", "jobs/table5.py"} if any(_rsync_excludes(p, f) for p in excludes)}
    assert not dropped, sorted(dropped)
    for folder in ("data/cifar-100-python", "runs/score", "results/table5.md", ".venv/bin/python"):
        assert any(_rsync_excludes(p, folder) for p in excludes), folder
