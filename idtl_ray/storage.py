"""Atomic writes and fingerprints: the one place that writes result files and hashes what they came from.

Writes. :func:`atomic_path` gives the writer a unique temporary name in the target's directory and
renames the finished file into place with ``os.replace``, so a reader sees either the old file or the
new one, never a partial one; if the writer raises, the temporary file is removed and the target is
untouched. The temporary file is created with mode ``0o666`` like any new file, so the result gets
the permissions the umask allows (``0o644`` under the usual ``022``), readable by teammates on shared
storage (``tempfile.mkstemp`` alone would leave ``0o600``). The thin writers below (text, JSON,
Parquet, npz, torch, matplotlib) are all built on it.

Fingerprints. :func:`digest` is sha256 over chunks in order, truncated to ``length`` hex characters
(16 by default); :func:`json_digest` hashes a JSON-like object with sorted keys; :func:`ids_digest`
hashes a multiset of sample ids independently of their order. Masks, splits and resumable runs on disk
carry these values, so their definitions never change.
"""

from __future__ import annotations

import fcntl
import errno
import hashlib
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, MaskError

__all__ = ["LOCK_NAME", "atomic_path", "digest", "hold_directory", "ensure_writable", "ids_digest", "json_digest", "json_default",
           "save_figure_atomic", "save_npz_atomic", "save_torch_atomic", "write_json_atomic", "write_table_atomic",
           "write_text_atomic"]


# ── writes ────────────────────────────────────────────────────────────────────────────────────────


def _not_writable(p: Path, e: OSError, option: str | None = None) -> MaskError:
    fix = f"pass {option} to a writable directory" if option else "give a path in a writable directory, with room left"
    return MaskError(f"cannot write {p} ({e.strerror or e}): {fix}")


# errors of the write itself, not of the writer's own inputs: reported as one line naming the path
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def check_local_out(out: str | os.PathLike[str] | None, option: str = "--out") -> None:
    """Refuse a URI as an output path at once: outputs (masks, checkpoints, Train and Tune state) are written
    as local files, so ``s3://b/x`` would become a folder ``s3:/b/x`` here."""
    if out is not None and "://" in str(out):
        raise InputError(f"{option} {out}: outputs are written as files, so {option} must be a local path (on a "
                         f"cluster, one under IDTL_SHARED_STORAGE); s3:// URIs work for --dataset and for "
                         f"`idtl-ray prepare --out`")


def local_out_path(out: str | os.PathLike[str], option: str = "--out") -> Path:
    """``out`` checked by :func:`check_local_out`, as an absolute path (what Train, Tune and run directories need)."""
    check_local_out(out, option)
    return Path(out).expanduser().resolve()


def ensure_writable(path: str | Path, option: str = "--out") -> Path:
    """Create the parent directory and check we can write there, before any expensive work (the error
    names ``option``, what sets the directory)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=".idtl-write-check-"):
            pass
    except OSError as e:
        raise _not_writable(p, e, option) from e
    return p


def _create_temporary(p: Path, suffix: str) -> Path:
    """Create an empty, unique ``.NAME.XXXXXXXX<suffix>`` next to ``p`` with mode 0o666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))  # what mkstemp does, but with a normal file's mode
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {p}")  # pragma: no cover


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a normal exit rename it to ``path``.

    The parent directory is created. The temporary file exists (empty) when yielded; the writer may
    open and truncate it or write it by name (``suffix`` sets its extension, for writers that infer
    the format from it). On any exception the temporary file is removed and ``path`` is untouched.
    ``fsync`` flushes the data to the disk before the rename. An unwritable directory raises
    :class:`~idtl_ray.errors.MaskError`, as :func:`ensure_writable` does.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(p, suffix)
    except OSError as e:
        raise _not_writable(p, e) from e
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, p)
        if fsync:  # the rename itself, so that a crash right after keeps the new file
            _fsync(p.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _WRITE_ERRNOS:
            raise _not_writable(p, e) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(text: str, path: str | Path, *, fsync: bool = False) -> None:
    """Write UTF-8 text (Markdown tables, CSV, JSON) atomically."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json_atomic(obj: Any, path: str | Path, *, indent: int | None = 2, fsync: bool = False) -> None:
    """Write ``obj`` as JSON atomically; it is serialised first, so a bad value writes nothing."""
    write_text_atomic(json.dumps(obj, indent=indent, default=json_default), path, fsync=fsync)


def write_table_atomic(table: Any, path: str | Path, *, fsync: bool = False, **kwargs: Any) -> None:
    """Write a ``pyarrow.Table`` as Parquet atomically (``kwargs`` go to ``pyarrow.parquet.write_table``)."""
    import pyarrow.parquet as pq

    with atomic_path(path, fsync=fsync) as tmp:
        pq.write_table(table, tmp, **kwargs)


def save_npz_atomic(path: str | Path, /, **arrays: Any) -> None:
    """``np.savez`` of arrays (or array-likes) atomically, through a file object: no ``.npz`` is appended."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically, then close the figure (also when saving fails)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


# ── fingerprints ──────────────────────────────────────────────────────────────────────────────────


def _update(h: Any, chunk: Any) -> None:
    if isinstance(chunk, str):
        h.update(chunk.encode("utf-8"))
    elif isinstance(chunk, np.ndarray):
        a = np.ascontiguousarray(chunk)
        if a.dtype.hasobject:
            raise TypeError("digest: an object array has no stable bytes")
        h.update(a.reshape(-1).view(np.uint8))  # the raw bytes in C order, without a copy
    else:
        try:
            h.update(memoryview(chunk))
        except TypeError:
            raise TypeError(f"digest: cannot hash a {type(chunk).__name__} (give bytes, str or a numpy array)") from None


def digest(*chunks: Any, length: int | None = 16) -> str:
    """sha256 over ``chunks`` in order, as ``length`` hex characters (``None``: all 64).

    A chunk is bytes (or any buffer), a str (hashed as UTF-8) or a numpy array (its raw bytes in C
    order, so ``digest(a, b) == sha256(a.tobytes() + b.tobytes())``). Nothing separates the chunks:
    give separators and shapes as chunks where they matter.
    """
    h = hashlib.sha256()
    for c in chunks:
        _update(h, c)
    return h.hexdigest()[:length]


def json_digest(obj: Any, length: int | None = 16) -> str:
    """:func:`digest` of ``obj`` as JSON with sorted keys (values JSON cannot hold hashed as ``str``)."""
    return digest(json.dumps(obj, sort_keys=True, default=str), length=length)


def ids_digest(ids: Any, length: int | None = 16) -> str:
    """Order-free fingerprint of a multiset of sample ids: :func:`digest` of the sorted little-endian int64 ids."""
    return digest(np.sort(np.asarray(ids, dtype="<i8")), length=length)


# ── ownership of an output directory ────────────────────────────────────────────────────────────

LOCK_NAME = ".idtl-lock"


@contextmanager
def hold_directory(out: str | Path) -> Iterator[None]:
    """Hold ``out`` for this process; another run into it refuses with one line while we hold it.

    An OS lock (flock), so a crashed run releases it with its process and never leaves a stale lock.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{out} is in use by another idtl-ray run (pid {owner}): wait for it to finish, "
                             "or choose another --out") from None
        except OSError as e:  # a file system without locks (some FUSE, CIFS): run, but say so
            print(f"  warning: cannot lock {out} ({e.strerror}); do not start a second run into it",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
