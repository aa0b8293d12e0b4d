"""A prepared directory's shards checked against their sha256, once per version of each file.

The Ray stages read the shards on workers, so the driver checks them when a command opens the
directory (:func:`idtl_ray.data.samples.open_target`). Hashing 150 MB of CIFAR takes about a second,
ImageNet's shards minutes, so a file that passed is stamped with its size and modification time in
``$IDTL_CACHE_DIR/verified/``: the next command hashes only what changed since. Where the file system
reports no modification time, every command hashes every shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import DataError, IdtlError
from ..storage import json_digest, write_json_atomic
from .prepare import Manifest, Shard, _first_line


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    """The file's sha256, streamed in 8 MiB chunks (never held whole)."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _stamp_file(fs: pafs.FileSystem, base: str, m: Manifest, location: str) -> Path:
    from .cache import cache_root

    key: list[object] = [fs.type_name, base, m.content_sha256]
    if fs.type_name == "s3":  # the same bucket/prefix on another S3-compatible store is another copy
        key += [os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"), location.partition("?")[2]]
    return cache_root() / "verified" / f"{json_digest(key, length=20)}.json"


def check_sha256(fs: pafs.FileSystem, base: str, m: Manifest, shards: Sequence[Shard], infos: Sequence[pafs.FileInfo],
                 location: str, damaged: Callable[[Shard], DataError]) -> None:  # fmt: skip
    """Raise ``damaged(shard)`` for the first shard whose bytes do not hash to the manifest's sha256.

    ``infos``: the shards' :class:`pyarrow.fs.FileInfo`, in the order of ``shards``; ``location``: the
    directory or URI as the user gave it, for messages. Shards stamped with their current size and
    modification time are not hashed again.
    """
    path = _stamp_file(fs, base, m, location)
    try:
        stamps = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamps = {}
    version = {s.file: [i.size, i.mtime_ns, s.sha256] for s, i in zip(shards, infos)}
    todo = [(s, i) for s, i in zip(shards, infos) if i.mtime_ns is None or stamps.get(s.file) != version[s.file]]
    if not todo:
        return
    try:
        with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:  # hashlib and the reads release the GIL
            sums = list(pool.map(lambda t: sha256_of(fs, t[1].path), todo))
    except OSError as e:  # S3 access denied, a mount gone stale: one line, not pyarrow's traceback
        raise DataError(f"cannot read the shards of {location}: {_first_line(e)}; check that the location is mounted and "
                        "readable (for s3://, the credentials)") from e
    for (s, _), sha in zip(todo, sums):
        if sha != s.sha256:
            raise damaged(s)
        stamps[s.file] = version[s.file]
    try:
        write_json_atomic(stamps, path)
    except (OSError, IdtlError):  # a read-only cache (MaskError from the writer) only costs another hash
        pass
