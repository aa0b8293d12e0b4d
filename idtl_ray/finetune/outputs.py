"""Stage 5 of a run: metrics, curves, the final model and the ids the workers trained on, all written atomically."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import models as M
from ..storage import atomic_path, save_figure_atomic, write_json_atomic
from .config import FinetuneConfig
from .plan import Plan, trainable_params
from .worker import ids_hash


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Validation accuracy and test error vs epoch (the paper's Figure 2), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((a1, "val_acc", "validation accuracy (%)"), (a2, "test_error", "test error (%)")):
        pts = [(r["epoch"] + 1, r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_outputs(cfg: FinetuneConfig, plan: Plan, out: Path, model: nn.Module, state: dict[str, Any],
                   seen: np.ndarray, info: dict[str, Any], name: str) -> dict[str, Any]:  # fmt: skip
    history = list(state["history"])
    last = history[-1]
    columns = ["epoch", "lr", "train_loss", "val_acc", "test_error"]
    write_json_atomic(history, out / "metrics.json")
    _write_csv(history, out / "metrics.csv", columns)
    plot_curves(history, out / "curves.png", f"{cfg.strategy}: {cfg.model} on {cfg.dataset}")
    with atomic_path(out / "seen_ids.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.sort(seen))
    final = {
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "epochs": len(history),
        "test_error": last["test_error"],
        "val_acc": last["val_acc"],
        "train_loss": last["train_loss"],
        "precision": last.get("precision", "fp32"),  # what --precision resolved to on the workers' device
        "n_train_samples": int(len(plan.train_ids)),
        "n_seen_epoch0": int(len(seen)),
        "seen_ids_hash": ids_hash(seen),
        "start_epochs": list(state["attempts"]),
        "weights": info["weights"],
        "head": info["head"],
        "trainable_params": trainable_params(model),
        "dataset_fingerprint": plan.data.fingerprint(),
        "split_fingerprint": plan.split.fingerprint() if plan.split is not None else None,
        "mask": str(plan.mask_path) if plan.mask_path else None,
        "run_name": name,
    }
    # classes: the head's class names (`score --head auto` keeps this head only for a target with these)
    M.save_checkpoint(out / "model.pt", model, {**{k: final[k] for k in (
        "strategy", "dataset", "dataset_fingerprint", "split_fingerprint", "epochs", "test_error", "n_train_samples")},
        "classes": list(plan.data.classes)})  # fmt: skip
    write_json_atomic(final, out / "final.json")  # last: its presence means the run is complete
    return final
