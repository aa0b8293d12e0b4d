"""A table's results: the JSON document, the Markdown table beside the paper's numbers, and the plots."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..storage import save_figure_atomic, write_json_atomic, write_text_atomic
from .specs import STRATEGY_TITLES, TableSpec, table_spec

if TYPE_CHECKING:  # runner imports this module
    from .runner import Resources


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def summarize(table: TableSpec, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, strategy): per-seed errors, mean, std, and the paper's number."""
    rows = []
    for s in table.settings:
        for strategy, epochs in s.arms():
            mine = sorted((r for r in runs if r["setting"] == s.key and r["strategy"] == strategy), key=lambda r: r["seed"])
            if not mine:
                continue
            errs = [float(r["test_error"]) for r in mine]
            m, sd = mean_std(errs)
            rows.append({"setting": s.key, "strategy": strategy, "paper_model": s.paper_model, "column": s.paper_column,
                         "row": s.row, "epochs": epochs, "seeds": [r["seed"] for r in mine], "per_seed": errs,
                         "mean": m, "std": sd, "paper": s.paper.get(strategy, s.paper.get("*")),
                         "n_train_samples": [r["n_train_samples"] for r in mine]})  # fmt: skip
    return rows


_HEAD_NOTE = ("The model-based and instance-based arms start from the scoring stage's model: the source's backbone "
              "with, where the source's classes are not the target's, a new head fitted as a linear probe on the "
              "training split (the samples the mask drops included). The paper (4.5) starts from a randomly "
              "initialised head. Hybrid-init arms build a fresh head.")


def _direction(summary: list[dict[str, Any]], table: TableSpec) -> list[dict[str, Any]]:
    """Per setting: does ours order the strategies as the paper does (instance < model < scratch)? Not for
    a table whose paper rows compare no strategies (Table 3: one error per frozen-layer count)."""
    if all(row[0] == "*" for row in table.paper_rows):
        return []
    out = []
    for s in table.settings:
        ours = {r["strategy"]: r["mean"] for r in summary if r["setting"] == s.key}
        order = [st for st in ("instance", "model", "scratch") if st in ours]
        if len(order) < 2:
            continue
        pairs = list(zip(order, order[1:]))
        out.append({"setting": s.key, "ours": ours,
                    "same_direction_as_paper": all(ours[a] < ours[b] for a, b in pairs)})  # fmt: skip
    return out


def report_mode(table: TableSpec) -> str:
    """The run's kind, as its report records it: ``smoke``, ``analogue`` or ``full``."""
    return "smoke" if table.smoke else "analogue" if table.analogue else "full"


def _document(table: TableSpec, seeds: list[int], runs: list[dict[str, Any]], wall_s: float, res: Resources) -> dict[str, Any]:
    summary = summarize(table, runs)
    return {
        "table": table.number,
        "mode": report_mode(table),
        "title": table.title,
        "analogue": table.analogue,
        "section": table.section,
        "seeds": seeds,
        "settings": [asdict(s) for s in table.settings],
        "source": asdict(table.source) if table.source else None,
        "resources": asdict(res),
        "runs": runs,
        "summary": summary,
        "direction": _direction(summary, table),
        "paper": [{"strategy": st, "model": m, "row": r, "errors": e} for st, m, r, e in table.paper_rows],
        "selection": table.selection,
        "notes": [*table.notes, _HEAD_NOTE],
        "timings": {"wall_s": round(wall_s, 1)},
        "idtl_ray_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _selection_line(selection: str, runs: list[dict[str, Any]]) -> str:
    """What chose the instance arm's samples, with the validation reference the runs recorded."""
    if selection != "paper":
        return ("**Selection**: idtl-ray's default (self-influence over the head, `--drop auto`); it has no "
                "validation reference, so a class-A reference does not apply.")
    refs = {str((r.get("validation_reference") or {}).get("classes", "all")) for r in runs} - {"all"}
    against = (f"the validation samples of class A (per seed: {', '.join(sorted(refs))})" if refs
               else "every validation sample")
    return f"**Selection**: the paper's (`delta_val_loss` against {against}; drop every score < 0)."


def render_markdown(doc: dict[str, Any], table: TableSpec | None = None) -> str:
    """The paper's table with the paper's numbers beside ours, then every run (``table``: the spec that ran)."""
    table = table or table_spec(doc["table"], doc["mode"] == "smoke")
    summ = doc["summary"]
    n_seeds = len(doc["seeds"])
    lines = [f"# Table {table.number}: {table.title} (paper {table.section})", ""]
    if table.smoke:
        s0 = table.settings[0]
        lines += [f"**Smoke run**: {s0.model} on {', '.join(dict.fromkeys(s.dataset for s in table.settings))} "
                  f"({s0.epochs} epoch; source model pre-trained on "
                  f"{table.source.dataset if table.source else '-'}), standing in for the paper's settings. It checks the "
                  f"pipeline; its numbers are not comparable with the paper's.", ""]  # fmt: skip
    if table.analogue:
        lines += [f"**Real-data analogue at a smaller scale**: {table.analogue} Compare the order of the "
                  f"strategies with the paper's, not the numbers.", ""]  # fmt: skip
    lines += [_selection_line(doc.get("selection", table.selection), doc.get("runs", [])), ""]
    lines += [f"Test error (%). Ours: mean ± std over {n_seeds} seeds {doc['seeds']}" if n_seeds > 1
              else f"Test error (%). Ours: seed {doc['seeds'][0]} (one seed, no std)", ""]  # fmt: skip

    def ours(strategy: str, model: str, row: str, column: str) -> list[dict[str, Any]]:
        return [r for r in summ if r["paper_model"] == model and r["column"] == column
                and (r["row"].split(" ")[0] == row if row else True) and (strategy == "*" or r["strategy"] == strategy)]  # fmt: skip

    if table.number == 3:
        lines += ["| Model | Frozen Layers | " + " | ".join(f"{c} paper | {c} ours model-based | {c} ours instance-based"
                                                          for c in table.columns) + " |",
                  "|---|---|" + "---|---|---|" * len(table.columns)]  # fmt: skip
        for _, model, row, errs in table.paper_rows:
            cells = []
            for c in table.columns:
                got = {r["strategy"]: r for r in ours("*", model, row, c)}
                cells += [f"{errs[c]:.2f}"] + [_fmt(got[st]["mean"], got[st]["std"]) if st in got else "not run"
                                               for st in ("model", "instance")]  # fmt: skip
            lines.append(f"| {model} | {row} | " + " | ".join(cells) + " |")
    else:
        lines += ["| Strategy | Model | " + " | ".join(f"{c} paper | {c} ours" for c in table.columns) + " |",
                  "|---|---|" + "---|---|" * len(table.columns)]  # fmt: skip
        for strategy, model, row, errs in table.paper_rows:
            cells = []
            for c in table.columns:
                got = ours(strategy, model, row, c)
                cells += [f"{errs[c]:.2f}", _fmt(got[0]["mean"], got[0]["std"]) if got else "not run"]
            lines.append(f"| {STRATEGY_TITLES[strategy]} | {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for d in doc.get("direction", []):
        verdict = "same as the paper" if d["same_direction_as_paper"] else "NOT as in the paper"
        order = ", ".join(f"{STRATEGY_TITLES[k]} {v:.2f}" for k, v in d["ours"].items())
        lines.append(f"- {d['setting']}: {order} -> strategy order {verdict} (paper: instance < model < scratch)")
    lines += ["", "## Runs", "",
              "| setting | seed | strategy | epochs | training samples | dropped by mask | test error (%) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["runs"]:
        extra = f" (uniform test {r['uniform_test_error']:.2f}, class A = {r['class_a']})" if "class_a" in r else ""
        lines.append(f"| {r['setting']}{' frozen ' + r['row'] if r['row'] else ''} | {r['seed']} | {r['strategy']} | "
                     f"{r['epochs']} | {r['n_train_samples']} | {r['n_dropped_by_mask']} of {r['n_scored']} | "
                     f"{r['test_error']:.2f}{extra} |")  # fmt: skip
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in doc["notes"]]
    lines += ["", f"Wall time {doc['timings']['wall_s']:.0f} s; idtl-ray {doc['idtl_ray_version']}; {doc['created_utc']}.", ""]
    return "\n".join(lines)


def plot_errors(doc: dict[str, Any], path: Path) -> None:
    """Bar chart: test error per strategy (mean, std bars) for every setting, paper numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = doc["summary"]
    groups = list(dict.fromkeys(r["setting"] for r in summ))
    strategies = [s for s in ("scratch", "model", "instance") if any(r["strategy"] == s for r in summ)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * max(1, len(strategies)) / 2), 3.8))
    w = 0.8 / max(1, len(strategies))
    for i, st in enumerate(strategies):
        xs, ms, sds, ps = [], [], [], []
        for g, key in enumerate(groups):
            r = next((r for r in summ if r["setting"] == key and r["strategy"] == st), None)
            if r is not None:
                xs.append(g + (i - (len(strategies) - 1) / 2) * w)
                ms.append(r["mean"])
                sds.append(r["std"] or 0.0)
                ps.append(r["paper"])
        ax.bar(xs, ms, w, yerr=sds, capsize=3, label=f"{STRATEGY_TITLES[st]} (ours)")
        px = [x for x, p in zip(xs, ps) if p is not None]
        ax.scatter(px, [p for p in ps if p is not None], marker="_", s=200, color="k", zorder=3,
                   label="paper" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Table {doc['table']} ({doc['mode']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def plot_curves(doc: dict[str, Any], path: Path) -> bool:
    """Test error per epoch of each run (first seed), from the runs' metrics.json; False when none exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = doc["seeds"][0]
    series = []
    for r in doc["runs"]:
        p = Path(r["run_dir"]) / "metrics.json"
        if r["seed"] == seed and p.is_file():
            hist = json.loads(p.read_text(encoding="utf-8"))
            pts = [(h["epoch"] + 1, h["test_error"]) for h in hist if h.get("test_error") is not None]
            if pts:
                series.append((f"{r['setting']} {r['strategy']}", pts))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in series:
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)" + (" (uniform test set)" if doc["table"] == 5 else ""))
    ax.set_title(f"Table {doc['table']} ({doc['mode']}), seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def write_results(doc: dict[str, Any], out: str | Path, table: TableSpec | None = None) -> dict[str, str]:
    """Write ``tableN.json``, ``tableN.md``, ``tableN.png`` and ``tableN_curves.png`` atomically."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    n = doc["table"]
    paths = {"json": root / f"table{n}.json", "md": root / f"table{n}.md", "png": root / f"table{n}.png",
             "curves": root / f"table{n}_curves.png"}  # fmt: skip
    if doc["summary"]:
        plot_errors(doc, paths["png"])
    else:
        paths.pop("png").unlink(missing_ok=True)  # no figure of this run: none of an older one either
    if not plot_curves(doc, paths["curves"]):
        paths.pop("curves").unlink(missing_ok=True)
    doc["files"] = {k: str(v) for k, v in paths.items()}
    write_json_atomic(doc, paths["json"])
    write_text_atomic(render_markdown(doc, table), paths["md"])
    return doc["files"]
