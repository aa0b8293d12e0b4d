"""A scoring run's working directory: the lock, resume, and the merge of the written score files.

    <out>/.idtl-lock             held (flock) by the run that owns <out>; a second run refuses
    <out>/parts/run.json         the run's fingerprint: a resume with other settings is refused
    <out>/parts/prescored.npz    s or the head factors, so a resume skips the pre-scoring stage (it
                                 records the fingerprint: another run's file is never used)
    <out>/parts/scores-<fingerprint>/*.parquet  (sample_id, score) files written by Ray Data

A file a killed write task left half-written does not parse: it is deleted and its samples scored
again. A retried task can write a sample twice: the merge keeps one copy (the scores are
deterministic, so either copy is the same number).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import IdtlError
from ..influence import SolveInfo
from ..storage import LOCK_NAME, hold_directory, save_npz_atomic, write_json_atomic  # noqa: F401  (the lock is re-exported)
from .prescore import Prescored


class RunParts:
    """The ``parts/`` folder of one run (or a throw-away one when the caller gave no ``--out``)."""

    def __init__(self, root: Path, fingerprint: str, resume: bool):
        self.root = root
        self.fingerprint = fingerprint
        self._rows: dict[Path, int] = {}  # rows of the complete score files seen so far (progress)
        # per fingerprint: a write task that outlives an earlier run can never add to this one
        self.scores_dir = root / f"scores-{fingerprint or 'run'}"
        manifest = root / "run.json"
        if root.exists() and not resume:
            shutil.rmtree(root)  # a fresh run never mixes with an old one
        if resume and manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != fingerprint:
                raise IdtlError(
                    f"cannot resume: the unfinished run in {root.parent} used other settings or data "
                    f"(fingerprint {old.get('fingerprint')} != {fingerprint}); drop --resume to start over")
        self.scores_dir.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            write_json_atomic({"fingerprint": fingerprint}, manifest)

    # ── the pre-scoring result ──

    def load_prescored(self) -> Prescored | None:
        """The saved s / factors of an earlier attempt of this run, if any."""
        f = self.root / "prescored.npz"
        if not f.exists():
            return None
        try:
            z = np.load(f, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            if meta.get("fingerprint") != self.fingerprint:  # another run's (its run.json was lost)
                return None
            payload: Any = z["s"] if "s" in z.files else {k[2:]: z[k] for k in z.files if k.startswith("f_")}
            return Prescored(payload, SolveInfo(**meta["solve"]), int(meta["n_val"]), {})
        except Exception:  # damaged or from another version: computed again, as a damaged score file is
            return None

    def save_prescored(self, p: Prescored) -> None:
        """Save it atomically (a unique temporary name, then rename)."""
        arrays = {"s": p.payload} if isinstance(p.payload, np.ndarray) else {f"f_{k}": v for k, v in p.payload.items()}
        save_npz_atomic(self.root / "prescored.npz", meta=json.dumps({"solve": p.solve.as_dict(), "n_val": p.n_val,
                                                                 "fingerprint": self.fingerprint}),
                        **arrays)

    # ── the written scores ──

    def _paths(self) -> list[Path]:
        return sorted(self.scores_dir.glob("*.parquet"))

    def settle(self, quiet_s: float = 1.0, limit_s: float = 20.0) -> None:
        """After an interruption: wait until no score file changes for ``quiet_s`` (writers that were in
        flight finish or die; at most ``limit_s``), then remove the damaged ones, so that what the user
        finds, and a resume counts, is complete files only."""
        def state() -> set[tuple[str, int, int]]:
            try:
                return {(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in self.scores_dir.rglob("*") if f.is_file()}
            except FileNotFoundError:  # a file renamed or removed while listed: look again
                return set()

        deadline, last, since = time.monotonic() + limit_s, state(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.1)
            if (now := state()) != last:
                last, since = now, time.monotonic()
        self.read_scores(drop_damaged=True)

    def files(self) -> int:
        """How many score files there are."""
        return len(self._paths())

    def rows_written(self) -> int:
        """Rows in the complete score files so far (progress; files still being written do not count)."""
        for f in self._paths():
            if f not in self._rows:  # a readable footer means a complete file: its count never changes
                try:
                    self._rows[f] = pq.read_metadata(f).num_rows
                except Exception:
                    pass
        return sum(self._rows.values())

    def read_scores(self, drop_damaged: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(sample_id, score) of every complete file, duplicates removed (first copy kept)."""
        ids, scores = [], []
        for f in self._paths():
            try:
                t = pq.read_table(f, columns=["sample_id", "score"])
            except Exception:
                if drop_damaged:
                    f.unlink(missing_ok=True)  # half-written by a killed task: its samples are scored again
                continue
            ids.append(t["sample_id"].to_numpy())
            scores.append(t["score"].to_numpy())
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        sid, sc = np.concatenate(ids), np.concatenate(scores)
        sid, first = np.unique(sid, return_index=True)
        return sid, sc[first]

    def merge(self, ids: np.ndarray) -> np.ndarray:
        """Scores aligned with ``ids`` (the training order); every id must have been scored."""
        sid, sc = self.read_scores()
        pos = np.searchsorted(sid, ids)
        found = (pos < len(sid)) & (sid[np.minimum(pos, len(sid) - 1)] == ids) if len(sid) else np.zeros(len(ids), bool)
        if not found.all():
            raise IdtlError(f"scoring lost {int((~found).sum())} samples (e.g. sample_id {ids[~found][:3].tolist()}): "
                            "re-run with --resume to score them")
        return sc[pos].astype(np.float64)
