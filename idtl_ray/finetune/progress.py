"""Progress of a fine-tuning run: the epochs Ray Train reports, printed by the driver.

The workers and Ray Train's controller are processes of their own: with ``log_to_driver=False`` none
of their prints reach the user. A Train callback posts rank 0's metrics of each report to a
mailbox actor, and a thread of the driver prints them while ``trainer.fit()`` blocks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Progress = Callable[[str], None]


def say(msg: str) -> None:
    """A progress line on stderr (as `score` prints them), flushed at once."""
    print(msg, file=sys.stderr, flush=True)


def emitter(progress: bool | Progress | None, prefix: str = "") -> Progress | None:
    """``True`` -> lines on stderr; a callable receives the lines; ``False``/``None`` -> silent."""
    if not progress:
        return None
    emit = say if progress is True else progress
    return (lambda msg: emit(prefix + msg)) if prefix else emit


def epoch_line(row: dict[str, Any], epochs: int, elapsed_s: float) -> str:
    """``epoch 2/10: train loss 0.4123, val acc 91.20%, test error 8.35% (63 s)``."""
    parts = [f"epoch {int(row['epoch']) + 1}/{epochs}: train loss {row['train_loss']:.4f}"]
    if row.get("val_acc") is not None:
        parts.append(f"val acc {row['val_acc']:.2f}%")
    if row.get("test_error") is not None:
        parts.append(f"test error {row['test_error']:.2f}%")
    return ", ".join(parts) + f" ({elapsed_s:.0f} s)"


class _ProgressBoard:
    """A mailbox actor: Ray Train's controller posts each epoch's metrics, the driver takes them.

    The controller (where callbacks run) is an actor of its own, and the workers too: with
    ``log_to_driver=False`` none of their prints reach the user, so the driver prints instead.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


def _epoch_callback(board: Any) -> Any:
    """A Ray Train ``UserCallback`` that posts rank 0's metrics of every report to ``board``."""
    from ray.train import UserCallback

    class EpochReporter(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and "epoch" in metrics[0]:
                board.put.remote(dict(metrics[0]))

    return EpochReporter()


class Relay:
    """While ``trainer.fit()`` blocks the driver, a thread prints the epochs the board receives."""

    def __init__(self, emit: Progress, epochs: int, poll_s: float = 0.5):
        import ray

        self.emit, self.epochs, self.poll_s = emit, epochs, poll_s
        self.board = ray.remote(_ProgressBoard).options(num_cpus=0).remote()  # needs no CPU: never blocks a worker
        self.callback = _epoch_callback(self.board)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._pending: Any = None  # a take() not read yet
        self._thread = threading.Thread(target=self._loop, name="idtl-train-progress", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def _drain(self) -> None:
        import ray

        # a take() whose reply timed out has still emptied the board: its rows are read on the next poll
        if self._pending is None:
            self._pending = self.board.take.remote()
        rows = ray.get(self._pending, timeout=10)
        self._pending = None
        for row in rows:
            # a finished run started again re-reports its last epoch (start_epoch is past it): not news
            if int(row["epoch"]) >= int(row.get("start_epoch", 0)):
                self.emit(epoch_line(row, self.epochs, time.monotonic() - self.t0))

    def _loop(self) -> None:
        from ray.exceptions import GetTimeoutError

        while not self._stop.wait(self.poll_s):
            try:
                self._drain()
            except GetTimeoutError:  # a slow reply (a loaded node, a worker restarting): read on the next poll
                continue
            except Exception:  # progress must never break training (e.g. Ray shutting down)
                return

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        # neither may raise (Ray may be down after a failed run): the training error is the one to surface
        with contextlib.suppress(Exception):
            self._drain()  # the last epoch's row, reported just before fit() returned
        with contextlib.suppress(Exception):
            ray.kill(self.board)
