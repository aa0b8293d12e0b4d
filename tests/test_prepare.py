"""Tests of `idtl-ray prepare`: Parquet shards + manifest.json, read back as the same dataset (issue 11)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from idtl_ray.data import TargetData, augmentation, load_dataset, make_split
from idtl_ray.data import prepare as P
from idtl_ray.data.readers import read_manifest, read_prepared
from idtl_ray.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> TargetData:
    return load_dataset("digits", download=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "digits"
    P.prepare_dataset("digits", str(out), download=False)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _one_line(e: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_manifest_describes_the_shards(prepared: Path, digits: TargetData) -> None:
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format"] == "idtl-ray-prepared" and m["version"] == 1
    assert m["dataset"] == "digits" and m["source"] == "digits" and m["classes"] == digits.classes
    assert m["image_shape"] == [8, 8, 1] and m["image_encoding"] == "raw"
    assert m["mean"] == list(digits.mean) and m["std"] == list(digits.std)
    assert m["counts"] == {"train": 1294, "val": 144, "test": 359}
    assert m["split"] == {"seed": 0, "val_fraction": 0.1, "val_source": "split",
                          "fingerprint": make_split(digits).fingerprint()}
    assert m["fingerprint"] == digits.fingerprint()  # masks made from the copy match masks made from the name
    assert sorted(s["file"] for s in m["shards"]) == ["test-00000.parquet", "train-00000.parquet", "val-00000.parquet"]
    lines = ""
    for s in m["shards"]:
        raw = (prepared / s["file"]).read_bytes()
        assert len(raw) == s["bytes"] and hashlib.sha256(raw).hexdigest() == s["sha256"]
        assert pq.read_metadata(prepared / s["file"]).num_rows == s["rows"]
        lines += f"{s['file']}:{s['sha256']}\n"
    assert m["content_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert not [p for p in prepared.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_schema_is_documented_one(prepared: Path) -> None:
    f = pq.ParquetFile(prepared / "train-00000.parquet")
    schema = f.schema_arrow
    assert [(n, str(schema.field(n).type)) for n in schema.names] == [
        ("sample_id", "int64"), ("label", "int64"), ("split", "string"), ("image", "binary")]
    assert schema.metadata[b"idtl_ray.image_shape"] == b"8,8,1"
    assert schema.metadata[b"idtl_ray.image_encoding"] == b"raw"


def test_load_dataset_of_the_directory_equals_the_registry_dataset(prepared: Path, digits: TargetData) -> None:
    for loc in (str(prepared), prepared.as_uri()):  # a local path, or a URI pyarrow opens
        d = load_dataset(loc)
        assert d.name == digits.name and d.classes == digits.classes and d.val is None
        for a, b in ((d.train, digits.train), (d.test, digits.test)):
            assert a.x.dtype == b.x.dtype and np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
        assert d.mean == digits.mean and d.std == digits.std
        assert d.fingerprint() == digits.fingerprint()
        assert make_split(d).fingerprint() == make_split(digits).fingerprint()
    assert augmentation(str(prepared)) is augmentation("digits") is None


def test_split_column_agrees_with_make_split(prepared: Path, digits: TargetData) -> None:
    split = make_split(digits, 0.1, 0)
    ids = {s: pq.read_table(prepared / f"{s}-00000.parquet", columns=["sample_id", "split"]) for s in P.SPLITS}
    assert set(ids["val"].column("split").to_pylist()) == {"val"}
    assert np.array_equal(ids["train"].column("sample_id").to_numpy(), split.train_ids)
    assert np.array_equal(ids["val"].column("sample_id").to_numpy(), split.val_ids)
    assert np.array_equal(ids["test"].column("sample_id").to_numpy(), np.arange(len(digits.test)))


def test_a_run_with_another_split_than_the_prepared_one_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare --val-fraction 0.3 --seed 5, then finetune with the defaults: each command makes its own
    split, which silently differed from the directory's split column (review, eleventh session)."""
    from idtl_ray.data.cache import ensure_prepared
    from idtl_ray.data.samples import open_target, split_note
    from idtl_ray.finetune import FinetuneConfig
    from idtl_ray.finetune.plan import make_plan

    d = tmp_path / "d"
    P.prepare_dataset("digits", str(d), val_fraction=0.3, seed=5, download=False)
    data = open_target(str(d))
    assert split_note(data, 0.3, 5) is None
    assert "prepared with --val-fraction 0.3 --seed 5" in split_note(data, 0.1, 0)
    heard: list[str] = []
    make_plan(FinetuneConfig(dataset=str(d), strategy="scratch", out=str(tmp_path / "o")), say=heard.append, write=False)
    assert any("this run splits with --val-fraction 0.1 --seed 0" in h for h in heard), heard
    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "cache"))  # the cache's copies: 0.1 / 0, no note for seed 1
    assert split_note(open_target(ensure_prepared("digits")), 0.1, 1) is None


def test_png_images_and_a_shipped_validation_split_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 70, 66, 3), dtype=np.uint8) for s, n in (("train", 30), ("test", 8), ("val", 5))}
    arrays.update({f"y_{s}": rng.integers(0, 3, n) for s, n in (("train", 30), ("test", 8), ("val", 5))})
    np.savez(tmp_path / "set.npz", **arrays)
    m = P.prepare_dataset(f"npz:{tmp_path / 'set.npz'}", str(tmp_path / "out"))
    assert m.image_encoding == "png" and m.split["val_source"] == "shipped"
    assert m.counts == {"train": 30, "val": 5, "test": 8}
    src, copy = load_dataset(f"npz:{tmp_path / 'set.npz'}"), load_dataset(str(tmp_path / "out"))
    assert copy.fingerprint() == src.fingerprint()
    for s in ("train", "test", "val"):
        assert np.array_equal(getattr(copy, s).x, getattr(src, s).x) and np.array_equal(getattr(copy, s).y, getattr(src, s).y)


def test_several_shards_and_a_rewrite_removes_stale_ones(tmp_path: Path, digits: TargetData) -> None:
    out = tmp_path / "out"
    m = P.write_prepared(digits, make_split(digits), str(out), shard_bytes=20_000)
    assert [s.file for s in m.shards if s.split == "train"] == ["train-00000.parquet", "train-00001.parquet"]
    assert np.array_equal(load_dataset(str(out)).train.x, digits.train.x)
    P.write_prepared(digits, make_split(digits), str(out))
    assert not (out / "train-00001.parquet").exists()
    assert load_dataset(str(out)).fingerprint() == digits.fingerprint()


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip-byte", "manifest"])
def test_damaged_directory_gives_one_line_naming_the_file_and_the_fix(prepared: Path, tmp_path: Path, damage: str) -> None:
    d = _copy(prepared, tmp_path)
    shard = d / "train-00000.parquet"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "delete":
        shard.unlink()
    elif damage == "flip-byte":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    else:
        (d / "manifest.json").write_text("{not json")
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    needle = "manifest.json" if damage == "manifest" else "train-00000.parquet"
    _one_line(e, needle, "re-run idtl-ray prepare --dataset", str(d))


def test_the_ray_stages_open_only_shards_that_match_their_checksums(prepared: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """open_target (what score and finetune read labels and ids through) checks each shard's sha256, once per
    version of the file; a change that keeps the size is caught (it only checked sizes: review, ninth session)."""
    import idtl_ray.data.verify as verify
    from idtl_ray.data.samples import open_target

    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "cache"))
    d = _copy(prepared, tmp_path)
    assert open_target(str(d)).fingerprint() == load_dataset("digits").fingerprint()
    hashed = []
    with monkeypatch.context() as mp:
        mp.setattr(verify, "sha256_of", lambda fs, path: hashed.append(path))
        open_target(str(d))  # stamped: nothing hashed again
    assert hashed == []
    shard = d / "train-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError) as e:
        open_target(str(d))
    _one_line(e, "train-00000.parquet is damaged (sha256 differs", "re-run idtl-ray prepare --dataset")


def test_an_unwritable_cache_does_not_block_reading_a_prepared_directory(prepared: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The verified-stamp cache is an optimisation: a cache path that cannot be written (read-only $HOME,
    a file in the way) cost every command on a prepared directory an error (review, eleventh session)."""
    from idtl_ray.data.samples import open_target

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    assert open_target(str(prepared)).fingerprint() == load_dataset("digits").fingerprint()


def test_unreachable_locations_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that cannot be created and an --out pyarrow cannot stat gave raw OSError tracebacks."""
    from idtl_ray.data.cache import ensure_prepared

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IDTL_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    with pytest.raises(DataError) as e:
        ensure_prepared("digits")
    _one_line(e, "cannot write the dataset cache", "set IDTL_CACHE_DIR to a writable directory")
    with pytest.raises(DataError) as e:
        P.prepare_dataset("digits", str(tmp_path / ("a" * 300)), download=False)
    _one_line(e, "cannot reach it", "check the path")


def test_a_second_prepare_into_a_directory_in_use_refuses(tmp_path: Path) -> None:
    """Two prepares into one directory deleted each other's temporary shards as stale; now the second one
    refuses in one line while the first holds the directory."""
    from idtl_ray.errors import InputError
    from idtl_ray.storage import hold_directory

    out = tmp_path / "d"
    with hold_directory(out):  # as a first prepare holds it while writing
        with pytest.raises(InputError, match="is in use by another idtl-ray run"):
            P.prepare_dataset("digits", str(out), download=False)
    assert P.prepare_dataset("digits", str(out), download=False).counts["train"] > 0  # free again


def test_a_resized_dataset_keeps_its_augmentation_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--image-size renames cifar10 to cifar10@16; the recipe lookup failed on that name (finetune refused,
    score's --drop auto trials silently trained without augmentation)."""
    from idtl_ray.data.augment import batch_augmentation

    assert batch_augmentation("cifar10@16") == batch_augmentation("cifar10") is not None
    assert repr(augmentation("svhn@64")) == repr(augmentation("svhn"))
    out = tmp_path / "d16"
    assert P.prepare_dataset("digits", str(out), image_size=16, download=False).dataset == "digits@16"
    assert batch_augmentation(str(out)) is None and augmentation(str(out)) is None  # the digits recipe, no error
    with pytest.raises(DataError, match="unknown dataset 'nosuch@16'"):
        batch_augmentation("nosuch@16")
    out.rename(tmp_path / "data@16")  # a prepared directory whose name looks resized is still a directory
    monkeypatch.chdir(tmp_path)
    assert batch_augmentation("data@16") is None


def test_directory_without_manifest_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "half"))
    _one_line(e, "no manifest.json", "re-run idtl-ray prepare")


def test_interrupted_write_leaves_no_manifest(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy(prepared, tmp_path)  # a complete earlier preparation: the re-run must invalidate it first
    real, calls = P._write_shard, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "_write_shard", dies_on_the_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare_dataset("digits", str(d), download=False)
    assert not (d / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest.json"):
        load_dataset(str(d))


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    fs, base = P.open_location(str(tmp_path))
    with pytest.raises(TypeError):
        P.write_atomic(fs, base, "x.bin", object())  # type: ignore[arg-type]  # fails after the temp file exists
    assert list(tmp_path.iterdir()) == []
    assert isinstance(fs, pafs.LocalFileSystem)


def test_bad_arguments_fail_before_loading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="val-fraction"):
        P.prepare_dataset("digits", str(tmp_path / "a"), val_fraction=1.5)
    with pytest.raises(DataError, match="--seed must be >= 0, got -1"):  # numpy's traceback, after the load, before
        P.prepare_dataset("digits", str(tmp_path / "a"), seed=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        P.prepare_dataset("digits", str(tmp_path / "file"))
    with pytest.raises(DataError, match="pyarrow cannot open"):
        P.prepare_dataset("digits", "nosuchscheme://bucket/x")
    assert not (tmp_path / "a").exists()


def test_read_prepared_gives_the_same_pixels_and_labels(ray_session, prepared: Path, digits: TargetData) -> None:
    split = make_split(digits)
    expected = {"train": (digits.train.x[split.train_ids], digits.train.y[split.train_ids], split.train_ids),
                "val": (digits.train.x[split.val_ids], digits.train.y[split.val_ids], split.val_ids),
                "test": (digits.test.x, digits.test.y, np.arange(len(digits.test)))}
    batches = list(read_prepared(str(prepared)).iter_batches(batch_size=None, batch_format="numpy"))
    got = {k: np.concatenate([b[k] for b in batches]) for k in ("x", "label", "sample_id", "split")}
    assert got["x"].dtype == np.uint8 and got["x"].shape[1:] == (8, 8, 1)
    for s, (x, y, ids) in expected.items():
        sel = got["split"] == s
        order = np.argsort(got["sample_id"][sel])
        assert np.array_equal(got["sample_id"][sel][order], ids)
        assert np.array_equal(got["x"][sel][order], x) and np.array_equal(got["label"][sel][order], y)
    assert read_prepared(str(prepared), "val", verify=True).count() == len(split.val_ids)
    with pytest.raises(DataError, match="unknown split"):
        read_prepared(str(prepared), "holdout")


def test_read_prepared_checks_the_files_first(prepared: Path, tmp_path: Path) -> None:
    d = _copy(prepared, tmp_path)
    (d / "val-00000.parquet").unlink()
    with pytest.raises(DataError) as e:
        read_prepared(str(d), "val")  # fails on the driver, before Ray is needed
    _one_line(e, "val-00000.parquet", "missing", "re-run idtl-ray prepare")
    assert read_manifest(str(d)).counts["val"] == 144


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "idtl_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_prepare(tmp_path: Path, digits: TargetData) -> None:
    r = _cli("prepare", "--dataset", "digits", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1294 train, 144 val, 359 test" in r.stdout and digits.fingerprint() in r.stdout
    assert read_manifest(str(tmp_path / "out")).fingerprint == digits.fingerprint()
    bad = _cli("prepare", "--dataset", "no-such-set", "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'no-such-set'"), bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_a_failed_download_leaves_no_empty_data_dir_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare --data-dir NEW` without the files used to leave NEW behind, made by the download attempt;
    a --data-dir that existed before stays."""
    import urllib.error

    import torchvision

    def offline(self) -> None:  # what torchvision's download does first, then the network fails
        os.makedirs(os.path.join(self.root, "cifar-10-batches-py"), exist_ok=True)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    new = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="cifar10: dataset files not found"):
        load_dataset("cifar10", data_dir=new)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError, match="cifar10: dataset files not found"):
        load_dataset("cifar10", data_dir=kept)
    assert kept.is_dir() and list(kept.iterdir()) == []
