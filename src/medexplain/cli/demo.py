"""``medexplain demo``: the product's embedded default, offline and in minutes.

Builds the planted 2D chest set (real radiograph, planted nodules: the labels are planted), trains or
loads the zoo classifier, explains a handful of positive test images with every available method, scores
each method's hit rate (pointing game, CheXlocalize) against the planted masks beside the random
baseline (the expected hit rate of a uniformly random point = the mask's area fraction), and writes
``report.html``, the maps (NIfTI) and ``metrics.json``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import typer

from . import app

# Options the demo gives methods that need more than (model, x, target); everything else runs on its defaults.
_METHOD_OPTIONS = {
    "gradcam": lambda model, size: {"layer": _cam(model)},
    "gradcam++": lambda model, size: {"layer": _cam(model)},
    "eigencam": lambda model, size: {"layer": _cam(model)},
    "occlusion": lambda model, size: {"window": max(2, size // 8), "stride": max(1, size // 16)},
    "integrated_gradients": lambda model, size: {"steps": 32},
}


def _cam(model):
    from ..models.zoo import cam_layer
    return cam_layer(model)


def run_demo(out="demo_out", seed: int = 0, size: str = "demo", n_cases: int = 8, methods=None,
             progress: bool = True, retrain: bool = False, console=None) -> dict:
    """Run the demo and return ``{"report", "accuracy", "auroc", "rows", "skipped", "seconds", ...}``."""
    import torch

    import medexplain as mx

    from ..io import write_json, write_nifti
    from ..models import zoo
    from ..report import write_report
    from ..training import evaluate

    say = console.print if console is not None else (lambda *a, **k: None)
    t0 = time.perf_counter()
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    model, ds = zoo.pretrained("chest_xray", seed=seed, size=size, progress=progress, retrain=retrain)
    t_model = time.perf_counter() - t0
    _, test = ds.split(ds.meta_info.get("train_frac", 0.8))
    perf = evaluate(model, test)
    say(f"classifier: {'loaded from cache' if model.zoo_info['cached'] else 'trained'} in {t_model:.1f} s; "
        f"test accuracy {perf['accuracy']:.3f}, AUROC {perf['auroc']:.3f} on {len(test)} planted test images")
    pos = (test.labels == 1).nonzero().flatten()[:n_cases]
    cases_ds = test.subset(pos)
    x, masks = cases_ds.images, cases_ds.masks
    with torch.no_grad():
        prob = model(x).softmax(1)
    names = list(methods) if methods else mx.available_methods()
    px = x.shape[-1]
    maps, rows, skipped = {}, [], {}
    baseline = float(masks.flatten(1).float().mean(1).mean())   # E[hit] of a uniformly random point
    for name in names:
        opts = _METHOD_OPTIONS.get(name, lambda m, s: {})(model, px)
        try:
            t = time.perf_counter()
            attr = mx.explain(model, x, method=name, target=1, **opts)
        except mx.errors.MedexplainError as e:   # e.g. a registered method that needs options we cannot guess
            skipped[name] = str(e)
            say(f"  [yellow]skipped {name}[/yellow]: {e}")
            continue
        hits = mx.metrics.hit_rate(attr.map, masks)
        hr = float(torch.nanmean(hits))
        maps[name] = attr.map
        rows.append({"method": name, "hit rate": hr, "random baseline": baseline,
                     "hits": f"{int(hits.nansum())}/{int((~hits.isnan()).sum())}",
                     "seconds": time.perf_counter() - t,
                     "model evaluations": int(attr.info.get("n_forward", 0) + attr.info.get("n_backward", 0))})
        say(f"  {name:<22} hit rate {hr:.3f} (random {baseline:.3f})  {rows[-1]['seconds']:.1f} s")
    cases = []
    for i in range(len(x)):
        write_nifti(x[i], out / "maps" / f"case{i}_image.nii.gz")
        write_nifti(masks[i].float(), out / "maps" / f"case{i}_mask.nii.gz")
        caps = {}
        for name, m in maps.items():
            write_nifti(m[i], out / "maps" / f"case{i}_{name.replace('+', 'p')}.nii.gz")
            hit = float(mx.metrics.hit_rate(m[i:i + 1], masks[i:i + 1])[0])
            caps[name] = "hit" if hit == 1 else "miss"
        nod = cases_ds.meta[i]["nodules"][0]
        cases.append({"image": x[i], "maps": {k: v[i] for k, v in maps.items()}, "mask": masks[i],
                      "title": f"test case {i} (planted nodule at row {nod['center'][0]:.0f}, col {nod['center'][1]:.0f}, "
                               f"radius {nod['radius']:.1f} px)",
                      "label": "nodule (planted)", "prediction": f"nodule p={float(prob[i, 1]):.2f}"
                      if prob[i, 1] >= 0.5 else f"normal p={float(prob[i, 0]):.2f}", "captions": caps})
    notes = ["The labels are planted: a real chest radiograph (pydicom-data RG1_UNCR.dcm) supplies the anatomy and "
             "a faint nodule-like blob was added at a recorded position (green outline). This is a demonstration "
             "model, not a diagnostic one.",
             f"Classifier (MONAI ResNet, zoo task chest_xray/{size}): test accuracy {perf['accuracy']:.3f}, "
             f"AUROC {perf['auroc']:.3f} on {len(test)} held-out images. Target explained: class 1 (nodule).",
             "Hit rate: the map's maximum (raw, signed) falls inside the planted mask. Random baseline: the expected "
             "hit rate of a uniformly random point, i.e. the mean mask area fraction."]
    notes += [f"Skipped {k}: {v}" for k, v in skipped.items()]
    report = write_report(out / "report.html", cases, [r["method"] for r in rows], rows,
                          title="medexplain demo: planted nodules on a real chest radiograph", notes=notes)
    seconds = time.perf_counter() - t0
    result = {"report": str(report), "accuracy": perf["accuracy"], "auroc": perf["auroc"], "rows": rows,
              "skipped": skipped, "random_baseline": baseline, "seconds": seconds, "model_seconds": t_model,
              "cached": model.zoo_info["cached"], "cache_path": model.zoo_info["path"], "n_cases": len(x)}
    write_json({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()},
               out / "metrics.json")
    return result


@app.command("demo")
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="folder for report.html, maps/ and metrics.json"),
         seed: int = typer.Option(0, help="data, training and method seed"),
         n_cases: int = typer.Option(8, "--n-cases", help="positive test images to explain"),
         methods: str = typer.Option("", help="comma-separated methods (default: every available method)"),
         size: str = typer.Option("demo", help="'demo' or 'small' (seconds; for smoke tests)"),
         retrain: bool = typer.Option(False, help="ignore cached weights and train again")):
    """Planted-nodule demo: train (or load) a classifier, explain it with every method, write report.html."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("[bold]medexplain demo[/bold]: planted nodules on a real chest radiograph (labels are planted)")
    res = run_demo(out, seed=seed, size=size, n_cases=n_cases,
                   methods=[m.strip() for m in methods.split(",") if m.strip()] or None, console=console)
    tab = Table(title="hit rate against the planted nodule masks")
    for c in ("method", "hit rate", "random baseline", "hits", "seconds"):
        tab.add_column(c, justify="left" if c == "method" else "right")
    for r in res["rows"]:
        tab.add_row(r["method"], f"{r['hit rate']:.3f}", f"{r['random baseline']:.3f}", r["hits"], f"{r['seconds']:.1f}")
    console.print(tab)
    console.print(f"test accuracy {res['accuracy']:.3f}; total {res['seconds']:.0f} s")
    console.print(f"report: [bold]{Path(res['report']).resolve()}[/bold]")
