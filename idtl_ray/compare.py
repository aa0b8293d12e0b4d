"""Pre-training a source model and the three-way comparison (paper Tables 1-2), over :func:`run_finetune`.

:func:`pretrain` is one scratch run on every training sample, saved as a project checkpoint;
:func:`run_compare` trains scratch, model-based and instance-based (and optional baselines' masks)
on the split the mask was scored on and writes the paper-style table. Both are importable from
:mod:`idtl_ray.finetune` as before. They call ``finetune.run_finetune`` through the module, looked
up at each call, so a test (or a caller) that replaces it there replaces it here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import data as D
from . import finetune as F
from . import models as M
from .errors import InputError, MaskError, WeightsError
from .finetune import STRATEGIES, STRATEGY_TITLES, FinetuneConfig, make_plan, mask_file
from .finetune.progress import Progress, emitter
from .mask import check_mask, read_mask, write_mask
from .storage import digest, ensure_writable, local_out_path, write_json_atomic, write_text_atomic


def pretrain(dataset: str, model: str, epochs: int, out: str | Path, batch_size: int = 128, lr: float = 1e-3,
             seed: int = 0, data_dir: str | None = None, image_size: int | None = None, *, workers: int = 1,
             cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, gpus: int | None = None,
             address: str | None = None, progress: bool | Progress = True) -> dict[str, Any]:  # fmt: skip
    """Train a source model (paper Table 1: Xavier, Adam 1e-3, batch 128) on every training sample.

    Uses the same TorchTrainer path (strategy scratch, ``split="none"``, no lr drop); the run lives in
    ``<out>.run/`` and the project checkpoint is written at ``out`` with meta {dataset, classes,
    dataset_fingerprint, epochs, test_error} (``classes``: the head's class names, which
    ``score --head auto`` compares with the target's). Returns that meta plus ``path``.
    ``progress``: lines ``pretrain: epoch k/n: ...`` on stderr (a callable receives them; False: silent).
    ``gpus``: N DDP workers with one GPU each, asked of the autoscaler on a cluster (as ``finetune --gpus``).
    """
    path = local_out_path(out)
    if path.is_dir():  # found only when saving, after the whole training
        raise InputError(f"--out {path} is a directory; pretrain writes one checkpoint file: pass e.g. {path / 'source.pt'}")
    ensure_writable(path)
    cfg = FinetuneConfig(dataset=dataset, model=model, strategy="scratch", split="none", epochs=epochs,
                         batch_size=batch_size, lr=lr, lr_drop_at=1.0, seed=seed, data_dir=data_dir,
                         image_size=image_size, workers=workers, cpus_per_worker=cpus_per_worker,
                         gpus_per_worker=gpus_per_worker, gpus=gpus, address=address, out=str(path) + ".run")  # fmt: skip
    final = F.run_finetune(cfg, progress=emitter(progress, "pretrain: ") or False)
    trained, run_meta = M.load_checkpoint(Path(cfg.out_dir) / "model.pt")
    classes = run_meta.get("classes") or make_plan(cfg).data.classes  # labels only, as the run read them
    meta = {"dataset": dataset, "classes": list(classes), "dataset_fingerprint": final["dataset_fingerprint"],
            "epochs": final["epochs"], "test_error": final["test_error"]}  # fmt: skip
    M.save_checkpoint(path, trained, meta)
    if emit := emitter(progress, "pretrain: "):
        emit(f"wrote {path} (test error {final['test_error']:.2f}%)")
    return {**meta, "path": str(path)}


def _resolve_mask(out: Path, mask: str | None, score_fn: Callable[[str], str] | None) -> Path:
    if mask:
        p = mask_file(mask)
        if not p.is_file():
            raise MaskError(f"mask {p} not found; run `idtl-ray score` first or leave --mask out to score now")
        return p
    p = out / "score" / "mask.parquet"
    if score_fn is not None:  # it resumes: a finished score with these settings comes back as is, another is refused
        return mask_file(str(score_fn(str(out / "score"))))
    if p.is_file():
        return p
    raise MaskError(f"no mask given and none at {p}; pass --mask or a score_fn that writes one")


def compare_table(rows: list[dict[str, Any]], dataset: str) -> str:
    """The paper-style table: strategy, model, test error (%) on ``dataset``, training samples, epochs."""
    lines = [f"| Strategy | Model | {dataset} test error (%) | training samples | epochs |", "|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["test_error"] is None else f"{r['test_error']:.2f}"
        title = r.get("label") or STRATEGY_TITLES[r["strategy"]]
        lines.append(f"| {title} | {r['model']} | {err} | {r['n_train_samples']} | {r['epochs']} |")
    return "\n".join(lines) + "\n"


def _baseline_mask_files(root: Path, mask_path: Path, split_path: Path, names: tuple[str, ...], dataset: str,
                         data_dir: str | None, image_size: int | None, seed: int,
                         address: str | None = None) -> list[tuple[str, Path, int]]:  # fmt: skip
    """Write ``<root>/mask-<name>.parquet`` for each baseline: the instance mask's k drops, chosen by ``name``.

    The baselines rank the split's training samples with the scored model beside the mask
    (``model.pt``), in one Ray worker that reads the images through Ray Data (the driver holds only
    labels). Each file carries the instance mask's metadata (so its fingerprints match) plus
    ``baseline``; a file made from the same mask, model and seed is reused, so a rerun resumes.
    """
    from .baselines import baseline_masks_task
    from .data.cache import ensure_prepared
    from .data.samples import RaySamples, open_target, read_samples
    from .scoring import ensure_ray
    from .scoring.prescore import run_on_worker

    mask = read_mask(mask_path)
    k = int((~mask.keep).sum())
    model_path = mask_path.parent / "model.pt"
    if not model_path.is_file():
        raise MaskError(f"--baselines ranks samples with the scored model, but there is no {model_path}; "
                        f"re-run `idtl-ray score` (it saves model.pt beside the mask) or leave --baselines out")  # fmt: skip
    data = open_target(ensure_prepared(dataset, data_dir, image_size, say=lambda m: print(m, flush=True)))
    split = D.Split.load(split_path)
    check_mask(mask, data.fingerprint(), split.fingerprint(), data.name)
    train, _, ids = D.apply_split(data, split)
    order = np.argsort(mask.sample_id, kind="stable")
    if len(mask) != len(ids) or not np.array_equal(mask.sample_id[order], np.sort(ids)):
        raise MaskError(f"the mask {mask_path} does not list exactly the split's {len(ids)} training samples, so "
                        f"the baselines cannot match it; re-run `idtl-ray score`")  # fmt: skip
    pos = order[np.searchsorted(mask.sample_id[order], ids)]  # mask row of each training sample
    model_sha = bytes.fromhex(digest(model_path.read_bytes(), length=None))
    source = digest(np.asarray(mask.sample_id, dtype=np.int64), mask.keep, model_sha, f"|{seed}")
    paths = {name: root / f"mask-{name}.parquet" for name in names}

    def current(p: Path) -> bool:
        try:
            return p.is_file() and read_mask(p).meta.get("baseline_source") == source
        except MaskError:
            return False

    todo = [name for name in names if not current(paths[name])]
    if todo:
        scored, meta = M.load_checkpoint(model_path)
        if meta.get("dataset_fingerprint") not in (None, data.fingerprint()):
            raise WeightsError(f"{model_path} was scored on another dataset; re-run `idtl-ray score` for {data.name}")
        ensure_ray(address)
        samples = RaySamples(read_samples(data, "train", materialize=False), ids, train.y, data.image_shape)
        keeps = run_on_worker(baseline_masks_task, (scored, samples, data.mean, data.std, k, todo, seed),
                              name="idtl-baselines", say=lambda m: print(f"baselines: {m}", flush=True),
                              what=f"ranking {len(ids)} training samples for {', '.join(todo)} (dropping {k} each)")
        for name, keep in keeps.items():
            write_mask(paths[name], ids, train.y, mask.scores[pos], keep,
                       {**mask.meta, "baseline": name, "baseline_source": source, "n_dropped": k,
                        "drop_rule": {"baseline": name, "k": k, "seed": seed}}, mask.score_name)  # fmt: skip
    return [(name, paths[name], k) for name in names]


def _check_options(root: Path, dataset: str, model: str, weights: str, epochs: int, scratch_epochs: int | None,
                   finetune_kw: dict[str, Any]) -> None:
    """Every option checked now, not after the scoring and the scratch run have taken their time."""
    bad = {"dataset", "model", "weights", "epochs", "strategy", "mask", "split", "out"} & set(finetune_kw)
    if bad:
        raise InputError(f"run_compare sets {', '.join(sorted(bad))} itself; pass them as its own arguments")
    M.check_weights_file(weights)
    for strategy in ("scratch", "model"):
        FinetuneConfig(dataset=dataset, model=model, weights=weights, strategy=strategy, out=str(root / strategy),
                       epochs=(scratch_epochs or epochs) if strategy == "scratch" else epochs,
                       **_strategy_kw(strategy, finetune_kw))


def _strategy_kw(strategy: str, finetune_kw: dict[str, Any]) -> dict[str, Any]:
    """The options of one strategy's run: from scratch, every layer trains (frozen random convolutions,
    ``--freeze-conv``, would be no from-scratch baseline; the paper's Table 6 has no scratch row)."""
    return {**finetune_kw, "freeze_conv": False} if strategy == "scratch" else finetune_kw


def run_compare(dataset: str, model: str, weights: str, epochs: int, *, out: str | Path, mask: str | None = None,
                score_fn: Callable[[str], str] | None = None, scratch_epochs: int | None = None,
                baselines: Sequence[str] | str | None = None, progress: bool | Progress = True,
                **finetune_kw: Any) -> dict[str, Any]:  # fmt: skip
    """Train scratch, model-based and instance-based on the same split; print and save the table.

    The split is the split.json beside the mask. Without ``mask``, ``score_fn(<out>/score) -> mask path``
    makes one or resumes the one there (the CLI's resumes the scoring stage, so a rerun reuses a finished
    score of the same settings and refuses another); without either, ``<out>/score/mask.parquet`` is used.
    ``scratch_epochs`` (default ``epochs``; the paper trains scratch longer) and ``finetune_kw``
    (any other :class:`FinetuneConfig` field) apply to all three runs. ``baselines`` (names from
    :data:`idtl_ray.baselines.METHODS`) adds one ``instance`` run per baseline on a mask that drops as
    many samples as the instance mask (``<out>/mask-<name>.parquet``, run in ``<out>/baseline-<name>``).
    Writes ``compare.md`` and ``compare.json`` in ``out``; returns ``{"rows": [...final dicts...],
    "table": str, "mask": path, "baselines": {name: mask path}}``. ``progress``: which run is training
    and its epochs, as lines ``compare <run>: ...`` on stderr (a callable receives them; False: silent).
    """
    from .baselines import parse_methods, row_label

    names = parse_methods(baselines)  # before any work
    root = local_out_path(out)
    _check_options(root, dataset, model, weights, epochs, scratch_epochs, finetune_kw)
    mask_path = _resolve_mask(root, mask, score_fn)
    split = mask_path.parent / "split.json"
    if not split.is_file():
        raise MaskError(f"no split.json beside the mask {mask_path}; the comparison needs the split the mask was scored on")
    extra = _baseline_mask_files(root, mask_path, split, names, dataset, finetune_kw.get("data_dir"),
                                 finetune_kw.get("image_size"), int(finetune_kw.get("seed", 0)),
                                 finetune_kw.get("address")) if names else []  # fmt: skip
    rows = []
    runs = len(STRATEGIES) + len(extra)

    def announce(i: int, name: str, title: str, cfg: FinetuneConfig) -> bool | Progress:
        """Say which run starts; the run's own lines get its name as prefix."""
        if emit := emitter(progress):
            emit(f"compare: run {i} of {runs}, {name} ({title}, {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''})")
        return emitter(progress, f"compare {name}: ") or False

    for i, strategy in enumerate(STRATEGIES, 1):
        cfg = FinetuneConfig(dataset=dataset, model=model, weights=weights, strategy=strategy,
                             epochs=(scratch_epochs or epochs) if strategy == "scratch" else epochs,
                             mask=str(mask_path) if strategy == "instance" else None, split=str(split),
                             out=str(root / strategy), **_strategy_kw(strategy, finetune_kw))  # fmt: skip
        rows.append(F.run_finetune(cfg, progress=announce(i, strategy, STRATEGY_TITLES[strategy], cfg)))
        print(f"{strategy}: test error {rows[-1]['test_error']:.2f}% on {rows[-1]['n_train_samples']} samples", flush=True)
    for i, (name, bmask, k) in enumerate(extra, len(STRATEGIES) + 1):  # the instance arm's run, on the baseline's mask
        cfg = FinetuneConfig(dataset=dataset, model=model, weights=weights, strategy="instance", epochs=epochs,
                             mask=str(bmask), split=str(split), out=str(root / f"baseline-{name}"), **finetune_kw)  # fmt: skip
        rows.append({**F.run_finetune(cfg, progress=announce(i, f"baseline-{name}", row_label(name, k), cfg)),
                     "baseline": name, "label": row_label(name, k)})
        print(f"{rows[-1]['label']}: test error {rows[-1]['test_error']:.2f}% on {rows[-1]['n_train_samples']} samples", flush=True)
    table = compare_table(rows, dataset)
    print(table, end="")
    write_text_atomic(table, root / "compare.md")
    result = {"rows": rows, "table": table, "mask": str(mask_path), "baselines": {n: str(p) for n, p, _ in extra}}
    write_json_atomic(result, root / "compare.json")
    return result
