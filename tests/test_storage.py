"""Tests of idtl_ray.storage: atomic writes (all or nothing, normal permissions) and fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from idtl_ray.data import load_dataset, make_split
from idtl_ray.errors import MaskError
from idtl_ray.storage import (atomic_path, digest, ensure_writable, ids_digest, json_digest, save_npz_atomic,
                              save_torch_atomic, write_json_atomic, write_table_atomic, write_text_atomic)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_writer_that_raises_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new", encoding="utf-8")
            raise RuntimeError("midway")
    assert target.read_text(encoding="utf-8") == "old"
    assert _listing(tmp_path) == ["result.json"]
    with pytest.raises(TypeError):  # serialised first: a bad value writes nothing
        write_json_atomic({"x": object()}, target)
    assert target.read_text(encoding="utf-8") == "old" and _listing(tmp_path) == ["result.json"]


def test_writers_replace_the_file_and_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "sub"
    write_text_atomic("a\n", out / "a.md")
    write_json_atomic({"n": np.int64(3), "v": np.arange(2), "p": Path("/x")}, out / "a.json")
    write_table_atomic(pa.table({"x": [1, 2]}), out / "a.parquet")
    save_npz_atomic(out / "a.npz", s=np.arange(3))
    save_torch_atomic({"w": 1}, out / "a.pt")
    write_text_atomic("b\n", out / "a.md", fsync=True)  # replaces
    assert _listing(out) == ["a.json", "a.md", "a.npz", "a.parquet", "a.pt"]
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    assert (out / "a.md").read_text(encoding="utf-8") == "b\n"
    assert json.loads((out / "a.json").read_text(encoding="utf-8")) == {"n": 3, "v": [0, 1], "p": "/x"}
    assert pq.read_table(out / "a.parquet").column("x").to_pylist() == [1, 2]
    assert np.load(out / "a.npz")["s"].tolist() == [0, 1, 2]


def test_figure_is_saved_and_closed(tmp_path: Path, umask_022: None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idtl_ray.storage import save_figure_atomic

    fig = plt.figure()
    save_figure_atomic(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and not plt.fignum_exists(fig.number)
    assert stat.S_IMODE((tmp_path / "f.png").stat().st_mode) == 0o644 and _listing(tmp_path) == ["f.png"]


def test_unwritable_directory_is_one_mask_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(MaskError, match="pass --out to a writable directory"):
        ensure_writable(blocker / "mask.parquet")
    with pytest.raises(MaskError, match="cannot write .*x.md .*give a path in a writable directory"):
        write_text_atomic("x", blocker / "x.md")
    # a failure of the rename itself (the target is a directory) is one line too, and leaves no temporary file
    (tmp_path / "adir").mkdir()
    with pytest.raises(MaskError, match=r"cannot write .*adir \(Is a directory\)"):
        write_text_atomic("x", tmp_path / "adir")
    assert _listing(tmp_path) == ["adir", "file"]


def test_digest_is_sha256_of_the_concatenation() -> None:
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    b = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))  # hashed in C order
    keep = np.array([True, False, True])
    whole = b"head|" + "é".encode() + a.tobytes() + b.tobytes() + keep.tobytes() + b""
    assert digest(b"head|", "é", a, b, keep, b"", length=None) == hashlib.sha256(whole).hexdigest()
    assert digest(b"x") == hashlib.sha256(b"x").hexdigest()[:16] and len(digest(b"x", length=12)) == 12
    assert digest(np.zeros((), np.int64)) == digest(bytes(8))
    assert json_digest({"b": [1, None], "a": Path("/p")}) == hashlib.sha256(
        json.dumps({"b": [1, None], "a": Path("/p")}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert ids_digest([5, 3, 9, 1, 3]) == ids_digest(np.array([3, 3, 1, 9, 5], np.int32)) == "60924ef0d5c06bee"
    with pytest.raises(TypeError):
        digest(np.array([object()]))
    with pytest.raises(TypeError):
        digest(3)


def test_known_fingerprints_stay_the_same() -> None:
    """Masks and splits on disk carry these values: a change of definition would orphan them."""
    digits = load_dataset("digits", download=False)
    assert digits.fingerprint() == "74386a5df671a830"
    assert make_split(digits).fingerprint() == "c1f6f7500f527f8f"


def test_read_mask_trusts_only_a_file_of_the_masks_schema(tmp_path: Path) -> None:
    """Damaged metadata and wrong column types are one MaskError; the metadata names the score column."""
    from idtl_ray.mask import META_KEY, read_mask, write_mask

    ids, labels = np.arange(10, 14), np.array([0, 1, 0, 1])
    write_mask(tmp_path / "m.parquet", ids, labels, np.array([0.1, 0.9, 0.2, 0.3]), np.array([1, 0, 1, 1], bool),
               {"dataset": "x", "score_column": "self_influence"}, "self_influence")
    good = pq.read_table(tmp_path / "m.parquet")
    assert read_mask(tmp_path / "m.parquet").kept_ids.tolist() == [10, 12, 13]

    def variant(name: str, table: pa.Table) -> Path:
        pq.write_table(table, tmp_path / name)
        return tmp_path / name

    broken = good.replace_schema_metadata({META_KEY: b"{not json"})
    with pytest.raises(MaskError, match="damaged metadata"):
        read_mask(variant("meta.parquet", broken))
    ints = good.set_column(3, "keep", pa.array([1, 0, 1, 1], pa.int64())).replace_schema_metadata(good.schema.metadata)
    with pytest.raises(MaskError, match="keep is int64, not bool"):  # kept_ids would have read them as positions
        read_mask(variant("ints.parquet", ints))
    both = good.append_column("delta_val_loss", pa.array([-1.0, 1.0, 2.0, 3.0])).select(
        ["sample_id", "label", "delta_val_loss", "self_influence", "keep"]).replace_schema_metadata(good.schema.metadata)
    m = read_mask(variant("both.parquet", both))
    assert m.score_name == "self_influence" and m.scores.tolist() == [0.1, 0.9, 0.2, 0.3]
    with pytest.raises(MaskError, match="damaged metadata .*a JSON list"):  # an AttributeError traceback before
        read_mask(variant("list.parquet", good.replace_schema_metadata({META_KEY: b"[1, 2]"})))
    holes = good.set_column(3, "keep", pa.array([True, None, True, False], pa.bool_())).replace_schema_metadata(
        good.schema.metadata)
    with pytest.raises(MaskError, match="missing values in keep"):
        read_mask(variant("holes.parquet", holes))


def test_inspect_prints_the_summary_even_where_the_plot_cannot_go(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from idtl_ray.cli import app
    from idtl_ray.mask import write_mask

    write_mask(tmp_path / "m.parquet", np.arange(4), np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.3]),
               np.array([1, 0, 1, 1], bool), {"dataset": "x", "n_dropped": 1}, "self_influence")
    (tmp_path / "plots").mkdir()
    ok = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.parquet"), "--png", str(tmp_path / "plots")])
    assert ok.exit_code == 0 and (tmp_path / "plots" / "scores.png").is_file(), ok.output  # a directory: scores.png in it
    assert "score: self-influence" in ok.stdout and "solver" not in ok.stdout  # the column says so; the meta does not
    (tmp_path / "blocker").write_text("")
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.parquet"), "--png", str(tmp_path / "blocker" / "p.png")])
    assert bad.exit_code == 2 and "dataset" in bad.stdout
    assert bad.stderr.startswith("error: cannot write") and bad.stderr.count("\n") == 1
    # a new directory given with a trailing slash gets scores.png in it (it became a PNG file named after it)
    ok = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.parquet"), "--png", str(tmp_path / "new") + "/"])
    assert ok.exit_code == 0 and (tmp_path / "new" / "scores.png").read_bytes()[:4] == b"\x89PNG", ok.output
    jpg = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.parquet"), "--png", str(tmp_path / "p.jpg")])
    assert jpg.exit_code == 2 and jpg.stderr.startswith("error: --png") and not (tmp_path / "p.jpg").exists()


def test_saved_prescoring_is_used_only_by_the_run_that_wrote_it(tmp_path: Path) -> None:
    """A resume whose run.json was lost must not pick up another run's s (its scores would be wrong)."""
    from idtl_ray.influence import SolveInfo
    from idtl_ray.scoring.parts import RunParts
    from idtl_ray.scoring.prescore import Prescored

    solve = SolveInfo("cg", 3, 1e-5, True, 1.0, 2.0)
    RunParts(tmp_path / "parts", "aaaa", resume=False).save_prescored(Prescored(np.arange(4.0), solve, 10))
    (tmp_path / "parts" / "run.json").unlink()
    assert RunParts(tmp_path / "parts", "bbbb", resume=True).load_prescored() is None
    (tmp_path / "parts" / "run.json").unlink()
    again = RunParts(tmp_path / "parts", "aaaa", resume=True).load_prescored()
    assert again is not None and np.array_equal(again.payload, np.arange(4.0)) and again.n_val == 10
