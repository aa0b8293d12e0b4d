"""What a finished scoring run says: the closing summary and the score plot of ``idtl-ray inspect``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .mask import Mask, read_mask
from .storage import save_figure_atomic



def format_summary(meta: dict[str, Any], mask: Mask | None = None) -> str:
    """The closing summary: kept/dropped per class, solver convergence, time per stage."""
    lines = []
    if mask is not None:  # the counts from the mask itself, the class names from the summary when it has them
        names = {r.get("label"): r.get("name") for r in meta.get("per_class", []) if isinstance(r, dict)}
        per = [{"label": c, "name": names.get(int(c)) or str(c), "kept": k, "dropped": d} for c, k, d in mask.per_class()]
    else:
        per = meta.get("per_class", [])
    n = meta.get("n_train", sum(r["kept"] + r["dropped"] for r in per))
    dropped = sum(r["dropped"] for r in per)
    lines.append(f"dataset {meta.get('dataset')}  model {meta.get('model')}  weights {meta.get('weights', '-')}")
    hd = meta.get("head")
    if isinstance(hd, dict) and hd.get("reason"):  # why the scored head is new or the weights' own
        n_out = hd.get("num_classes", "")
        what = f"new {n_out}-class head fitted" if hd.get("new_head") else f"kept the weights' {n_out}-class head"
        why = "; ".join(x for x in (f"--head {hd.get('mode')}" if hd.get("mode") not in (None, "auto") else "",
                                    (("WARNING: " if hd.get("warning") else "") + str(hd["why"])) if hd.get("why") else "")
                       if x)
        lines.append(f"head: {what}" + (f" ({why})" if why else ""))
    if isinstance(hd, dict) and str(hd.get("warning", "")).startswith("--weights none"):
        lines.append(f"WARNING: {hd['warning']}")
    s = meta.get("solve", {})
    inf = meta.get("influence", {})
    kind = "self" if mask is not None and mask.score_name == "self_influence" else meta.get("score", inf.get("score"))
    if kind == "self":  # the mask's own column decides: its metadata may not say
        lines.append(f"score: self-influence over the head's {inf.get('head_params')} (EK-FAC, damping "
                     f"{inf.get('head_damping')} x mean eigenvalue); high = likely mislabelled, dropped first")
    else:
        ref = meta.get("validation_reference", {})
        lines.append(f"score: delta_val_loss against validation classes {ref.get('classes')} ({ref.get('n_samples')} samples)")
        lines.append(f"solver {s.get('solver')} on {inf.get('curvature')} curvature, damping {inf.get('damping')}: "
                     f"{s.get('iterations')} iterations, relative residual {s.get('relative_residual', float('nan')):.2e}"
                     f" ({'converged' if s.get('converged') else 'NOT converged to tol ' + str(inf.get('tol'))})")
    rule = meta.get("drop_rule") or {}
    if rule.get("rule") == "auto":
        tried = ", ".join(f"{t['k']}: {100 * t['val_error']:.2f}%" if t.get("val_error") is not None else f"{t['k']}: failed"
                          for t in rule.get("trials", []))
        lines.append(f"drop rule auto: validation error per samples dropped ({tried}); chose {rule.get('k')} "
                     f"({rule.get('choice', '')})")
    elif rule.get("rule"):
        lines.append(f"drop rule {rule['rule']}: " + ", ".join(f"{k} {v}" for k, v in rule.items() if k != "rule"))
    lines.append(f"kept {n - dropped} / dropped {dropped} of {n} training samples ({100 * dropped / max(n, 1):.1f}% dropped)")
    lines.append(f"{'class':<16}{'kept':>8}{'dropped':>9}")
    for r in per[:100]:
        lines.append(f"{str(r['name'])[:15]:<16}{r['kept']:>8}{r['dropped']:>9}")
    if len(per) > 100:  # a 1,000-class target: the rest are in summary.json's per_class
        lines.append(f"... and {len(per) - 100} more classes (all in summary.json)")
    tm = meta.get("timings", {})
    if tm:
        lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in tm.items()))
    return "\n".join(lines)


def inspect_mask(path: str | Path, png: str | Path | None = None) -> tuple[str, Path]:
    """Summary text of a mask, and a PNG of the score distribution per class (written atomically)."""
    mask = read_mask(path)
    return format_summary(mask.meta, mask), plot_scores(mask, plot_path(path, png))


def plot_path(mask_path: str | Path, png: str | Path | None = None) -> Path:
    """Where the plot goes: ``png`` (a directory, or a path ending in a separator: ``scores.png`` in it; else
    a ``.png`` file), else ``scores.png`` beside the mask."""
    p = Path(mask_path)
    if png is None:
        return (p if p.is_dir() else p.parent) / "scores.png"
    out = Path(png)
    if out.is_dir() or str(png).endswith(("/", os.sep)):
        return out / "scores.png"
    if out.suffix.lower() != ".png":
        raise InputError(f"--png {png}: the plot is a PNG; give a .png file name or a directory (ending in /)")
    return out


def plot_scores(mask: Mask, png: Path) -> Path:
    """The score distribution per class as a PNG at ``png`` (atomically), with the rule's cut when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.unique(mask.label)
    fig, ax = plt.subplots(figsize=(max(6, min(0.35 * len(labels), 30)), 4))
    data = [mask.scores[mask.label == c] for c in labels]
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(labels) + 1), [str(int(c)) for c in labels], fontsize=7 if len(labels) > 20 else 9)
    self_score = mask.score_name == "self_influence"
    # the cut between what the rule dropped and what it kept (a baseline's drops follow another ranking)
    cut_line = (~mask.keep).any() and not mask.meta.get("baseline")
    if cut_line:
        cut = mask.scores[~mask.keep].min() if self_score else mask.scores[~mask.keep].max()
        ax.axhline(cut, color="r", lw=0.8, ls="--", label="drop above" if self_score else "drop below")
    ax.set_xlabel("class")
    ax.set_ylabel(mask.score_name)
    what = "self-influence (high = likely mislabelled)" if self_score else "predicted change of summed val loss if removed"
    ax.set_title(f"{mask.meta.get('dataset')}: {what}; {int((~mask.keep).sum())} of {len(mask)} dropped", fontsize=9)
    if cut_line:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, png, dpi=110)
    return png
