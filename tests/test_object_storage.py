"""Data on object storage: a dataset prepared into an S3 bucket is read by every Ray stage as a directory is.

The bucket is moto's S3 server (a real HTTP endpoint, in a subprocess of its own), reached the way a user
reaches MinIO or AWS: pyarrow's S3 file system configured by the standard ``AWS_*`` environment variables,
which Ray's worker processes inherit from the process that starts the local Ray (as a cluster's workers
inherit them from ``ray start``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from idtl_ray.config import ScoreConfig
from idtl_ray.data import load_dataset, make_split
from idtl_ray.data import prepare as P
from idtl_ray.data.readers import read_manifest
from idtl_ray.errors import DataError
from idtl_ray.finetune import FinetuneConfig, run_finetune
from idtl_ray.mask import read_mask
from idtl_ray.models import build_model, save_checkpoint
from idtl_ray.workflow import run_score

BUCKET = "idtl"
# Starts moto's S3 server on a free port and prints the port: a subprocess, so that the server answers
# while this process computes (a thread here would wait for the GIL).
_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request; errors still reach stderr
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes stdin
server.stop()
"""


def _s3_env(port: int) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # fmt: skip (a CI proxy must not take local requests)


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    """``s3://idtl`` on a local S3 server, with the environment pointing at it for this module (Ray included)."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.strip().isdigit(), f"the S3 server did not start (exit {server.poll()}); its stderr is above"
        port = int(line)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in _s3_env(port).items():
                mp.setenv(key, value)
            # from_uri, as idtl-ray opens locations: pyarrow's S3FileSystem() constructor ignores AWS_ENDPOINT_URL
            pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")[0].create_dir(BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def prepared(bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """digits prepared twice, into the bucket and into a local directory."""
    local = str(tmp_path_factory.mktemp("local") / "digits")
    remote = f"{bucket}/digits"
    digits = load_dataset("digits", download=False)
    for out in (local, remote):  # small shards: several per split, so reads are split across them
        P.write_prepared(digits, make_split(digits), out, source="digits", shard_bytes=20_000)
    return {"local": local, "s3": remote}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A stand-in for pre-trained weights: a seeded sample-cnn for 8x8 grey images (a new head is fitted)."""
    path = tmp_path_factory.mktemp("weights") / "source.pt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("sample-cnn", 10, in_channels=1, image_size=8), {"dataset": "stand-in"})
    return str(path)


@pytest.fixture(scope="module")
def s3_ray(bucket: str, ray_session):
    """The module's Ray, started after ``bucket`` set the environment its workers inherit."""

    def endpoint() -> str | None:  # nested: shipped by value (this test module is not importable in a worker)
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray_session.get(ray_session.remote(endpoint).remote()) == os.environ["AWS_ENDPOINT_URL"]
    return ray_session


def _closed_port() -> int:
    """A port nothing listens on: bound by this process, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _objects(uri: str) -> dict[str, int]:
    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_prepare_writes_the_same_dataset_into_a_bucket(prepared: dict[str, str]) -> None:
    local = {p.relative_to(prepared["local"]).as_posix(): p.stat().st_size
             for p in Path(prepared["local"]).rglob("*") if p.is_file() and p.name != ".lock"}  # fmt: skip
    remote = _objects(prepared["s3"])
    assert remote == local  # the same shards and manifest, byte for byte in size, and no temporary object left
    assert len([k for k in remote if k.endswith(".parquet")]) > 3
    assert read_manifest(prepared["s3"]) == read_manifest(prepared["local"])  # checksums and fingerprint included


def _score_cfg(dataset: str, weights: str, out: Path) -> ScoreConfig:
    return ScoreConfig(dataset=dataset, weights=weights, out=str(out), actors=2, shard_size=300, drop="budget", drop_budget=0.1)


def test_scoring_reads_a_bucket_as_it_reads_a_directory(s3_ray, prepared: dict[str, str], weights: str,
                                                        tmp_path: Path) -> None:  # fmt: skip
    masks = {}
    for where in ("local", "s3"):
        run_score(_score_cfg(prepared[where], weights, tmp_path / where), progress=False)
        masks[where] = read_mask(tmp_path / where / "mask.parquet")
    local, remote = masks["local"], masks["s3"]
    assert len(remote.sample_id) == 1294 and remote.sample_id.tolist() == local.sample_id.tolist()
    scale = float(np.abs(local.scores).max())
    assert np.abs(remote.scores - local.scores).max() <= 1e-5 * scale
    assert remote.keep.tolist() == local.keep.tolist() and int((~remote.keep).sum()) == 129
    assert remote.meta["dataset_fingerprint"] == local.meta["dataset_fingerprint"]


def test_fine_tuning_reads_a_bucket(s3_ray, prepared: dict[str, str], weights: str, tmp_path: Path) -> None:
    run_score(_score_cfg(prepared["s3"], weights, tmp_path / "score"), progress=False)
    cfg = FinetuneConfig(dataset=prepared["s3"], strategy="instance", mask=str(tmp_path / "score"), weights=weights, epochs=2,
                         batch_size=64, workers=2, cpus_per_worker=0.5, out=str(tmp_path / "run"))  # fmt: skip
    final = run_finetune(cfg)
    assert final["n_train_samples"] == final["n_seen_epoch0"] == 1294 - 129  # every kept sample was read, once
    assert final["test_error"] < 50  # percent: it learned from what it read (chance: 90)


def test_a_prefix_without_a_dataset_is_one_line(bucket: str) -> None:
    with pytest.raises(DataError, match=r"s3://idtl/nothing: no manifest.json") as e:
        read_manifest(f"{bucket}/nothing")
    assert "\n" not in str(e.value)


def test_an_unreachable_endpoint_is_one_line(prepared: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DataError, match="cannot read manifest.json") as e:
        read_manifest(prepared["s3"])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="--out s3://idtl/other: cannot reach it") as e:
        P.prepare_dataset("digits", "s3://idtl/other", download=False)
    assert "\n" not in str(e.value)


def test_storage_settings_that_must_be_local_refuse_a_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache and the raw files are written and read as local files: a URI would have become the local
    folder ``s3:/b/c`` (Path collapses the double slash), silently."""
    from idtl_ray.data.cache import cache_root

    monkeypatch.setenv("IDTL_CACHE_DIR", "s3://idtl/cache")
    with pytest.raises(DataError, match="IDTL_CACHE_DIR=s3://idtl/cache: the cache is written as files"):
        cache_root()
    monkeypatch.delenv("IDTL_CACHE_DIR")
    with pytest.raises(DataError, match="--data-dir s3://idtl/raw: the raw dataset files are read as local files"):
        load_dataset("cifar10", "s3://idtl/raw", download=False)
    monkeypatch.setenv("IDTL_DATA_DIR", "s3://idtl/raw")
    with pytest.raises(DataError, match="IDTL_DATA_DIR s3://idtl/raw"):
        load_dataset("cifar10", download=False)


def test_unreadable_shards_are_one_line_naming_the_uri(prepared: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:  # fmt: skip
    """Access denied or throttling after the manifest was read: one line naming the location as given."""
    from idtl_ray.data import samples, verify

    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path))  # no stamps: every shard is hashed

    def denied(*args, **kwargs):
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")

    monkeypatch.setattr(verify, "sha256_of", denied)
    with pytest.raises(DataError, match=r"cannot read the shards of s3://idtl/digits: .*ACCESS_DENIED") as e:
        samples.open_target(prepared["s3"])
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(samples.pq, "read_table", denied)
    with pytest.raises(DataError, match=r"s3://idtl/digits: cannot read the labels of shard train-00000.parquet") as e:
        samples.open_target(prepared["s3"])
    assert "\n" not in str(e.value)


def test_a_failed_shard_listing_is_one_line(prepared: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from idtl_ray.data import samples

    _, base = P.open_location(prepared["s3"])

    class Throttled:  # the location's file system, whose listing fails as S3 does under throttling
        def get_file_info(self, paths):
            raise OSError("AWS Error SLOW_DOWN during HeadObject operation: Please reduce your request rate.")

    monkeypatch.setattr(samples, "open_location", lambda location: (Throttled(), base))
    with pytest.raises(DataError, match=r"s3://idtl/digits: cannot list the shards \(OSError: AWS Error SLOW_DOWN") as e:
        samples.open_target(prepared["s3"])
    assert "\n" not in str(e.value)


def test_hash_stamps_of_one_bucket_on_two_endpoints_are_apart(prepared: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A MinIO mirror of the same bucket and prefix is another copy: its shards are hashed on their own."""
    from idtl_ray.data import verify

    fs, base = P.open_location(prepared["s3"])
    m = read_manifest(prepared["s3"])
    here = verify._stamp_file(fs, base, m, prepared["s3"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://mirror.example:9000")
    assert verify._stamp_file(fs, base, m, prepared["s3"]) != here
    monkeypatch.undo()
    assert verify._stamp_file(fs, base, m, prepared["s3"]) == here
    assert verify._stamp_file(fs, base, m, prepared["s3"] + "?endpoint_override=mirror.example:9000") != here
    local_fs, local_base = P.open_location(prepared["local"])  # a local directory's key is unchanged by S3 settings
    local = verify._stamp_file(local_fs, local_base, m, prepared["local"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://mirror.example:9000")
    assert verify._stamp_file(local_fs, local_base, m, prepared["local"]) == local
