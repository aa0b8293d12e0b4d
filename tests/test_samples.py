"""The score stage's data path: the cache of named datasets, labels without images, Ray Data samples.

Proves: a dataset given by name is prepared once and then reused (changed source files are prepared
again); a prepared directory opened for its labels gives the same split and fingerprint as the
in-memory dataset; RaySamples.gather returns exactly the arrays' rows in the asked order, in a Ray
worker; and `run_score` on a prepared directory never loads the images into the driver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from idtl_ray.config import ScoreConfig
from idtl_ray.data import apply_split, load_dataset, make_split, write_prepared
from idtl_ray.data.cache import cached_location, ensure_prepared
from idtl_ray.data.samples import RaySamples, open_target, read_samples
from idtl_ray.errors import DataError
from idtl_ray.influence import InfluenceConfig


def _npz(path, n: int = 120, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), y_train=np.arange(n) % 3,
             x_test=rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8), y_test=np.arange(30) % 3)
    return f"npz:{path}"


def test_a_named_dataset_is_prepared_once_and_again_when_its_files_change(tmp_path, monkeypatch):
    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "cache"))
    name = _npz(tmp_path / "a.npz")
    said: list[str] = []
    first = ensure_prepared(name, say=said.append)
    assert len(said) == 2 and "preparing" in said[0]
    assert ensure_prepared(name, say=said.append) == first and len(said) == 2  # reused, nothing prepared
    assert open_target(first).fingerprint() == load_dataset(name).fingerprint()
    _npz(tmp_path / "a.npz", seed=1)  # same path, other pixels
    second = ensure_prepared(name, say=said.append)
    assert second != first and len(said) == 4
    assert open_target(second).fingerprint() == load_dataset(name).fingerprint()


def test_a_prepared_directory_is_used_as_is_and_must_have_the_asked_size(tmp_path):
    data = load_dataset("digits")
    loc = str(tmp_path / "digits")
    write_prepared(data, make_split(data, 0.1, 0), loc)
    assert ensure_prepared(loc) == loc
    with pytest.raises(DataError, match="--image-size 16"):
        ensure_prepared(loc, image_size=16)
    assert cached_location("digits", image_size=16) != cached_location("digits")


def test_the_cache_key_stamps_only_the_datasets_own_files(tmp_path, monkeypatch):
    """Another dataset's download into the same --data-dir keeps a cached copy valid; a copy prepared while
    its files were being downloaded is found by the next run (review, ninth session)."""
    import idtl_ray.data.cache as cache

    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "cache"))
    dd = tmp_path / "data"
    dd.mkdir()
    before = cached_location("cifar10", dd)
    (dd / "MNIST" / "raw").mkdir(parents=True)
    (dd / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"x")
    (dd / "cifar-10-python.tar.gz").write_bytes(b"x")
    assert cached_location("cifar10", dd) == before  # other files of the folder: same key
    (dd / "cifar-10-batches-py").mkdir()
    (dd / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    assert cached_location("cifar10", dd) != before  # its own files changed: prepared again

    def download_and_prepare(name, data_dir, image_size, out):  # as torchvision's download, then prepare
        (Path(data_dir) / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"y")
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(cache, "_run_child", download_and_prepare)
    monkeypatch.setattr(cache, "check_source", lambda name: None)
    first = ensure_prepared("cifar10", dd)
    assert first == str(cached_location("cifar10", dd)) and Path(first, "manifest.json").is_file()
    assert ensure_prepared("cifar10", dd) == first  # the next run finds it
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()] == [Path(first).name]


def test_labels_without_images_give_the_same_split_and_fingerprint(tmp_path):
    data = load_dataset("digits")
    loc = str(tmp_path / "digits")
    write_prepared(data, make_split(data, 0.1, 0), loc)
    target = open_target(loc)
    assert target.fingerprint() == data.fingerprint() and target.classes == data.classes
    assert np.array_equal(target.train.y, data.train.y) and np.array_equal(target.test.y, data.test.y)
    for seed, frac in ((0, 0.1), (3, 0.25)):  # any split, not only the one written into the directory
        a, b = make_split(target, frac, seed), make_split(data, frac, seed)
        assert a.fingerprint() == b.fingerprint()
        (tl, vl, _), (ta, va, _) = apply_split(target, a), apply_split(data, b)
        assert np.array_equal(tl.y, ta.y) and np.array_equal(vl.y, va.y)
        assert not hasattr(tl, "x")  # labels only


def test_ray_samples_gather_the_asked_rows_in_order_in_a_worker(ray_session, tmp_path):
    import ray

    data = load_dataset("digits")
    loc = str(tmp_path / "digits")
    split = make_split(data, 0.1, 0)
    write_prepared(data, split, loc)
    target = open_target(loc)
    ds = read_samples(target, "train", rows=100)
    assert ds.num_blocks() >= len(data.train) // 100  # blocks sized for the pool, not one per shard
    _, _, ids = apply_split(target, split)
    samples = RaySamples(ds, ids, target.train.y[ids], target.image_shape)
    pos = np.array([17, 3, 1000, 0, 555])
    x, y = ray.get(ray.remote(num_cpus=1)(lambda s: s.gather()).remote(samples.take(pos)))
    assert np.array_equal(x, data.train.x[ids[pos]]) and np.array_equal(y, data.train.y[ids[pos]])
    x_all, _ = samples.gather()
    assert np.array_equal(x_all, data.train.x[ids])


def test_run_score_never_loads_the_images_into_the_driver(ray_session, tmp_path, monkeypatch):
    import idtl_ray.data.readers as readers
    import idtl_ray.data.registry as registry
    import idtl_ray.data.samples as samples
    from idtl_ray.workflow import run_score

    data = load_dataset("digits")
    loc = str(tmp_path / "digits")
    write_prepared(data, make_split(data, 0.1, 0), loc)

    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded the images")

    for owner, fn in ((registry, "load_dataset"), (readers, "load_prepared"), (samples.RaySamples, "gather")):
        monkeypatch.setattr(owner, fn, refuse)  # workers are other processes (classes pickle by name): unguarded
    out = run_score(ScoreConfig(dataset=loc, head="new", drop="budget", drop_budget=0.1, out=str(tmp_path / "run"),
                                influence=InfluenceConfig(batch_size=256)), progress=False)
    assert out["n_train"] == len(make_split(data, 0.1, 0).train_ids) and out["n_dropped"] == int(0.1 * out["n_train"])
    assert out["head"]["new_head"] is True


def test_a_read_is_run_again_when_a_node_left_the_cluster_and_only_then(capsys) -> None:
    """An autoscaler scaled a worker node down while the job read its dataset (CI's fake cluster: Ray Data's
    FooterReader actor died with its node, re-raised as an unserialisable exception): read again."""
    from ray.exceptions import ActorDiedError

    from idtl_ray.data.samples import lost_a_node, materialize_surviving_node_loss

    class Dataset:
        def __init__(self, errors: list[BaseException]):
            self.errors, self.calls = errors, 0

        def materialize(self) -> str:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return "blocks"

    wrapped = RuntimeError("Failed to deserialize exception.\nray.exceptions.ActorDiedError: The actor died because "
                           "its node has died.")
    ds = Dataset([wrapped, ActorDiedError()])
    assert materialize_surviving_node_loss(ds) == "blocks" and ds.calls == 3
    assert capsys.readouterr().err.count("a node left the cluster while reading") == 2
    with pytest.raises(RuntimeError, match="deserialize"):  # three in a row: the last one is the user's
        materialize_surviving_node_loss(Dataset([wrapped] * 3))
    other = Dataset([ValueError("bad parquet")])
    with pytest.raises(ValueError, match="bad parquet"):
        materialize_surviving_node_loss(other)  # anything else at once
    assert other.calls == 1
    outer = RuntimeError("the read failed")
    outer.__cause__ = ActorDiedError()
    assert lost_a_node(outer) and not lost_a_node(ValueError("x"))  # found through the chain of causes
