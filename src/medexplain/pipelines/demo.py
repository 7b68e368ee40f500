"""The demo pipeline (``medexplain demo``): the product's embedded default, offline and in minutes.

Builds the planted 2D chest set (real radiograph, planted nodules: the labels are planted), trains or
loads the zoo classifier, explains a handful of positive test images with every method that applies to
it (:func:`medexplain.available_methods` with the model and the batch) through the explain stage of the one
case pipeline (:func:`medexplain.pipelines.explain_method`, which ``explain`` and ``run`` use for each method of
a case: the cost estimate, the counted rows behind the progress bars), scores each method's hit rate
(the pointing game, CheXlocalize; :func:`medexplain.metrics.hit_rate`) against the planted masks beside
the random baseline (the expected hit rate of a uniformly random point: the mask's area fraction), the
CAMs (methods with an ``upsample`` option) also with MONAI's bilinear upsampling beside the default
receptive-field aligned one (``docs/cam.md``), and writes ``report.html``, the maps (NIfTI) and
``metrics.json``, every file atomically.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from medexplain.engine.core import forward, model_guard, resolve_device
from medexplain.engine.explain import available_methods
from medexplain.engine.registry import accepted_options, get_method
from medexplain.errors import MedexplainError
from medexplain.io import check_output_dir, file_stem, method_file, write_json, write_nifti
from medexplain.io.report import write_report
from medexplain.metrics.localisation import hit_rate
from medexplain.models import zoo
from medexplain.models.training import evaluate
from medexplain.pipelines import CaseWriter, case_model, explain_case, write_map
from medexplain.pipelines import method_options as pipeline_options

__all__ = ["DemoCase", "DemoWriter", "MethodProgress", "method_options", "choose_methods", "score_methods",
           "write_cases", "run_demo"]

def method_options(name: str, model, px: int) -> dict:
    """The demo's options for method ``name`` on ``model`` at ``px`` pixels: the cheap options the method
    declares for a quick look (:meth:`medexplain.engine.registry.Method.preview_options`), and the zoo's CAM layer
    (:func:`medexplain.models.zoo.cam_layer`) for a method that takes a ``layer``."""
    spec = get_method(name)
    opts = spec.preview_options(px)
    if spec.options() is not None and spec.takes("layer"):
        opts["layer"] = zoo.cam_layer(model)
    return opts


def choose_methods(model, x: torch.Tensor, methods=None) -> tuple[list[str], dict[str, str]]:
    """``(methods to run, {skipped method: reason})``: every method that applies to ``model`` on ``x``
    (:func:`medexplain.available_methods`), or those of ``methods`` that exist and apply."""
    if methods is None:
        return available_methods(model=model, x=x), {}
    with torch.no_grad(), model_guard(model):
        out = forward(model, x.to(next(model.parameters()).device))
    names, skipped = [], {}
    for name in methods:
        try:
            why = get_method(name).why_not(model, out)
        except MedexplainError as e:
            skipped[name] = str(e)
            continue
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
    return names, skipped


@dataclass
class MethodScores:
    """What :func:`score_methods` returns: the maps and a row per method that ran, the methods skipped."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class MethodProgress:
    """Progress of one method's rows through the model, and its time estimate from the measured first calls.

    ``rows(n)`` is the :func:`~medexplain.engine.options.counting` callback. Once the rows since the first call
    reach :data:`ESTIMATE_AFTER` of the expected total and :data:`ESTIMATE_CALLS` calls have passed, the
    remaining rows are extrapolated at the per-row time measured since the end of the first call (which
    carries the warm-up and the method's own set-up), and the estimate is announced through ``log`` when it
    exceeds :data:`ANNOUNCE_SECONDS`. ``bar``: a Rich ``Progress`` (None: no bar). Measured on the demo set
    (README): Med-CAM's first steps are slower than the rest and it stops early (its rows are an upper bound),
    so its estimate runs high; waiting for 20 % of the rows keeps it within 2x."""

    ESTIMATE_AFTER = 0.20
    ESTIMATE_CALLS = 3
    ANNOUNCE_SECONDS = 5.0

    def __init__(self, name: str, total: int | None, bar=None, log: Callable[[str], None] = lambda _s: None):
        self.name, self.total, self.bar, self.log = name, total, bar, log
        self.t0 = time.perf_counter()
        self.done, self.calls, self.first = 0, 0, None
        self.estimate: float | None = None
        self.task = bar.add_task(name, total=total) if bar is not None else None

    def rows(self, n: int) -> None:
        self.done += n
        self.calls += 1
        now = time.perf_counter() - self.t0
        if self.first is None:
            self.first = (now, self.done)
        elif self.estimate is None and self.total:
            t1, r1 = self.first
            if self.done - r1 >= self.ESTIMATE_AFTER * self.total and self.calls >= self.ESTIMATE_CALLS:
                per_row = (now - t1) / max(1, self.done - r1)
                self.estimate = now + per_row * max(0, self.total - self.done)
                if self.estimate > self.ANNOUNCE_SECONDS:
                    self.log(f"  {self.name}: ~{self.estimate:.0f} s estimated from its first {self.done} of "
                             f"{self.total} rows ({per_row * 1e3:.1f} ms per row)")
        if self.bar is not None:
            total = self.total if self.total is None or self.done <= self.total else self.done
            self.bar.update(self.task, completed=self.done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.remove_task(self.task)


def _progress_bar(progress: bool | None):
    """A Rich progress display on stderr (rows, elapsed, remaining), or a null context: shown when
    ``progress`` is True, or None and stderr is a terminal."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    console = Console(stderr=True)
    if not (progress if progress is not None else console.is_terminal):
        return contextlib.nullcontext(None)
    return Progress(TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console, transient=True)


def score_methods(model, cases, masks: torch.Tensor, names, target: int = 1, seed: int = 0,
                  log: Callable[[str], None] = lambda _s: None, progress: bool | None = None) -> MethodScores:
    """Explain each case file of ``cases`` (:func:`write_cases`) for ``target`` with each method of ``names``
    through the one case pipeline (:func:`medexplain.pipelines.explain_case`, seeded with ``seed`` as ``run``
    seeds its cases) and score its hit rate against ``masks`` (one per case) beside the random baseline (the mean
    mask area fraction). A method that fails with a medexplain error is skipped with its message. ``progress``: a
    bar per method over its rows through the model on all cases, on stderr (None: only when stderr is a terminal);
    every method's rows, its estimate from the first calls (:class:`MethodProgress`) and its time go into its row."""
    res = MethodScores()
    baseline = float(masks.flatten(1).float().mean(1).mean())
    m = case_model(model)   # the model object every case runs through
    with _progress_bar(progress) as bar:
        for name in names:
            _score_one(m, list(cases), masks, name, target, seed, baseline, res, log, bar)
    return res


class DemoWriter(CaseWriter):
    """The demo's maps of one method, case by case: each map on the image grid as ``<case stem>_<method>.nii.gz``
    beside its case file (:func:`medexplain.pipelines.write_map`; ``write=False``: kept only), collected with its
    cost for the scoring and the report."""

    def __init__(self, write: bool = True):
        self.write, self.maps, self.n_evaluations = write, [], 0

    def method(self, state, method, attr, amap):
        self.maps.append(amap)
        self.n_evaluations += int(attr.info.get("n_forward", 0) + attr.info.get("n_backward", 0))
        if self.write:
            path = Path(state.images[0])
            write_map(amap, path.parent / f"{file_stem(path).removesuffix('_image')}_{method_file(method)}.nii.gz",
                      state.meta, spatial_dims=state.img.ndim - 1)
        return []

    def failed(self, state, method, error):
        raise error    # the method is skipped (a medexplain error) or the demo stops (anything else)


def _explain_cases(model, cases, name, target, opts, seed, writer, progs=None, bar=None, log=None) -> torch.Tensor:
    """``name`` on every case through :func:`medexplain.pipelines.explain_case`; its maps stacked ``(B, C_or_1, ...)``.
    With ``progs``, one :class:`MethodProgress` over the rows of all cases (made at the first case's estimate)."""
    base = [0]

    def estimate(est):
        if not progs:
            progs.append(MethodProgress(name, None if est.n_forward is None else est.n_forward * len(cases), bar, log))

    def rows(_method, done, _total):
        progs[0].rows(base[0] + done - progs[0].done)

    for case in cases:
        if progs is not None:
            base[0] = progs[0].done if progs else 0
        explain_case(model, [case], [name], writer, per_method={name: opts}, target=target, seed=seed,
                           on_estimate=estimate if progs is not None else None,
                           on_progress=rows if progs is not None else None)
    return torch.stack(writer.maps)


def _score_one(model, cases, masks, name, target, seed, baseline, res: MethodScores, log, bar) -> None:
    opts = {**pipeline_options([name], None, None, seed)[name],
            **method_options(name, model.networks[0], masks.shape[-1])}
    progs: list[MethodProgress] = []   # made once the pipeline has estimated the method's rows
    writer = DemoWriter()
    t = time.perf_counter()
    try:   # the one case pipeline, case by case
        maps = _explain_cases(model, cases, name, target, opts, seed, writer, progs, bar, log)
    except MedexplainError as e:
        res.skipped[name] = str(e)
        log(f"  [yellow]skipped {name}[/yellow]: {e}")
        return
    finally:
        for prog in progs:
            prog.close()
    prog = progs[0]
    seconds = time.perf_counter() - t
    hits = hit_rate(maps, masks)
    res.maps[name] = maps
    # Perturbation maps are constant over a patch or superpixel: the first maximal pixel (CheXlocalize's
    # rule) is the block's corner, which can miss a small nodule that the block covers; say how often.
    # How many pixels share the maximum says how much that figure means (a constant map hits every mask).
    anyp = hit_rate(maps, masks, ties="any")
    flat = maps.flatten(1)
    at_max = (flat == flat.amax(1, keepdim=True)).sum(1)   # torch.median: the lower middle element
    row = {"method": name, "hit rate": float(torch.nanmean(hits)), "random baseline": baseline,
           "hits": f"{int(hits.nansum())}/{int((~hits.isnan()).sum())}",
           "hits (any maximal pixel)": f"{int(anyp.nansum())}/{int((~anyp.isnan()).sum())}",
           "maximal pixels (median)": int(at_max.median()), "pixels": int(flat.shape[1])}
    if "upsample" in (accepted_options(name) or ()):   # CAMs: MONAI's bilinear placement beside the aligned one
        bil = hit_rate(_explain_cases(model, cases, name, target, {**opts, "upsample": "bilinear"}, seed,
                                      DemoWriter(write=False)), masks)
        row.update({"hit rate (bilinear upsampling)": float(torch.nanmean(bil)),
                    "hits (bilinear upsampling)": f"{int(bil.nansum())}/{int((~bil.isnan()).sum())}"})
    row.update({"seconds": seconds, "estimated seconds": prog.estimate, "rows": prog.done,
                "model evaluations": writer.n_evaluations})
    res.rows.append(row)
    also = (f", bilinear upsampling {row['hit rate (bilinear upsampling)']:.3f}"
            if "hit rate (bilinear upsampling)" in row else "")
    log(f"  {name:<22} hit rate {row['hit rate']:.3f}{also} (random {baseline:.3f})  {seconds:.1f} s")


@dataclass
class DemoCase:
    """One explained test image as the report shows it."""

    image: torch.Tensor
    mask: torch.Tensor
    maps: dict
    title: str
    prediction: str
    captions: dict

    def as_report_case(self) -> dict:
        return {"image": self.image, "maps": self.maps, "mask": self.mask, "title": self.title,
                "label": "nodule (planted)", "prediction": self.prediction, "captions": self.captions}


def _cases(x, masks, maps, meta, prob) -> list[DemoCase]:
    cases = []
    for i in range(len(x)):
        caps = {name: "hit" if float(hit_rate(m[i:i + 1], masks[i:i + 1])[0]) == 1 else "miss" for name, m in maps.items()}
        nod = meta[i]["nodules"][0]
        pred = f"nodule p={float(prob[i, 1]):.2f}" if prob[i, 1] >= 0.5 else f"normal p={float(prob[i, 0]):.2f}"
        cases.append(DemoCase(x[i], masks[i], {k: v[i] for k, v in maps.items()},
                              f"test case {i} (planted nodule at row {nod['center'][0]:.0f}, col {nod['center'][1]:.0f}, "
                              f"radius {nod['radius']:.1f} px)", pred, caps))
    return cases


def write_cases(folder: Path, x: torch.Tensor, masks: torch.Tensor) -> list[Path]:
    """The demo's test images as case files ``case<i>_image.nii.gz`` (with their planted masks,
    ``case<i>_mask.nii.gz``) in ``folder``: what :func:`score_methods` explains, case by case, and the maps are
    written beside. Returns the image files."""
    cases = []
    for i in range(len(x)):
        cases.append(write_nifti(x[i], folder / f"case{i}_image.nii.gz"))
        write_nifti(masks[i].float(), folder / f"case{i}_mask.nii.gz")
    return cases


def _notes(size: str, perf: dict, n_test: int, skipped: dict) -> list[str]:
    notes = ["The labels are planted: a real chest radiograph (pydicom-data RG1_UNCR.dcm) supplies the anatomy and "
             "a faint nodule-like blob was added at a recorded position (green outline). This is a demonstration "
             "model, not a diagnostic one.",
             f"Classifier (MONAI ResNet, zoo task chest_xray/{size}): test accuracy {perf['accuracy']:.3f}, "
             f"AUROC {perf['auroc']:.3f} on {n_test} held-out images. Target explained: class 1 (nodule).",
             "Hit rate: the map's maximum (raw, signed) falls inside the planted mask. Random baseline: the expected "
             "hit rate of a uniformly random point, i.e. the mean mask area fraction. Hits (any maximal pixel): "
             "a hit if any pixel where the map reaches its maximum is in the mask; it differs from hits only for "
             "maps with a plateau at the top (perturbation methods' patches and superpixels), where the first "
             "maximal pixel is the block's corner. Maximal pixels (median over the cases) says how large that plateau "
             "is: where it approaches the image size (a constant map) the any-pixel figure means nothing."]
    return notes + [f"Skipped {k}: {v}" for k, v in skipped.items()]


def run_demo(out="demo_out", seed: int = 0, size: str = "demo", n_cases: int = 8, methods=None,
             progress: bool | None = None, retrain: bool = False, log: Callable[[str], None] | None = None,
             device=None) -> dict:
    """Run the demo into the folder ``out`` and return ``{"report", "accuracy", "auroc", "rows", "skipped",
    "random_baseline", "seconds", "model_seconds", "cached", "cache_path", "n_cases"}`` (also written as
    ``metrics.json``). ``methods``: names to run (default: every method that applies to the classifier);
    ``size``: the zoo configuration (``"demo"``, or ``"small"`` for smoke tests); ``log``: a line printer;
    ``progress``: progress bars on stderr for the training and every method (None: only on a terminal);
    ``device``: where the classifier is evaluated and explained (``None``: the CPU, ``"auto"``: CUDA when
    present, ``"cpu"``, ``"cuda[:N]"``; :func:`medexplain.engine.core.resolve_device`); maps come back on the CPU."""
    say = log or (lambda _s: None)
    if progress is None:
        from rich.console import Console
        progress = Console(stderr=True).is_terminal
    t0 = time.perf_counter()
    dev = resolve_device(device)   # a device this machine lacks is a typed error before any work
    out = check_output_dir(out)  # before the training and the explanations (issue 27)
    model, ds = zoo.pretrained("chest_xray", seed=seed, size=size, progress=progress, retrain=retrain)
    if dev is not None:
        model.to(dev)   # the zoo's classifier, in place: explain moves each batch to it
    t_model = time.perf_counter() - t0
    _, test = ds.split(ds.meta_info.get("train_frac", 0.8))
    perf = evaluate(model, test)
    say(f"classifier: {'loaded from cache' if model.zoo_info['cached'] else 'trained'} in {t_model:.1f} s; "
        f"test accuracy {perf['accuracy']:.3f}, AUROC {perf['auroc']:.3f} on {len(test)} planted test images")
    cases_ds = test.subset((test.labels == 1).nonzero().flatten()[:n_cases])
    x, masks = cases_ds.images, cases_ds.masks
    names, skipped = choose_methods(model, x, methods)
    for k, v in skipped.items():
        say(f"  [yellow]skipped {k}[/yellow]: {v}")
    files = write_cases(out / "maps", x, masks)
    scores = score_methods(model, files, masks, names, target=1, seed=seed, log=say, progress=progress)
    skipped.update(scores.skipped)
    with torch.no_grad():
        prob = model(x.to(next(model.parameters()).device)).softmax(1).cpu()
    cases = _cases(x, masks, scores.maps, cases_ds.meta, prob)
    report = write_report(out / "report.html", [c.as_report_case() for c in cases], [r["method"] for r in scores.rows],
                          scores.rows, title="medexplain demo: planted nodules on a real chest radiograph",
                          notes=_notes(size, perf, len(test), skipped))
    baseline = float(masks.flatten(1).float().mean(1).mean())
    result = {"report": str(report), "accuracy": perf["accuracy"], "auroc": perf["auroc"], "rows": scores.rows,
              "skipped": skipped, "random_baseline": baseline, "seconds": time.perf_counter() - t0,
              "model_seconds": t_model, "cached": model.zoo_info["cached"], "cache_path": model.zoo_info["path"],
              "n_cases": len(x)}
    write_json({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()},
               out / "metrics.json")
    return result
