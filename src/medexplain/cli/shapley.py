"""``medexplain shapley IMAGE --model MODEL [--model MODEL ...] --contrasts T1,T1c,T2,FLAIR --out DIR``.

Contrast-level Shapley values of one multi-contrast image for one or several models (several models =
the folds of a cross-validation, Ren et al. 2025), with the agreement of each model's contrast ranking
with a reference ranking and the rank uncertainty across the models.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import app

console = Console(stderr=True)

VALUE_HELP = ("value of a coalition: 'probability:K' = mean probability of output channel K (default "
              "probability:1); 'dice:REGION' against --seg, REGION = ET, TC, WT, NCR, ED (BraTS labels 1, 2, 4) "
              "or labels joined by '+' (dice:1, dice:1+4)")


def _fail(err: Exception):
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def _read_channels(paths: list[Path]):
    """One multi-channel file (4D NIfTI channels last, .npy (C, *spatial)), or one file per contrast."""
    import torch

    from medexplain import io
    from medexplain.errors import InputError
    imgs = [io.read_image(p) for p in paths]
    if len(imgs) > 1:
        shapes = {tuple(t.shape[1:]) for t, _ in imgs}
        if len(shapes) != 1:
            raise InputError(f"the contrast files have different grids: {sorted(shapes)}")
    return torch.cat([t for t, _ in imgs], 0), imgs[0][1]


def _value_fn(value: str, seg, class_labels, activation: str, channel: Optional[int]):
    from medexplain.errors import InputError
    from medexplain.shapley import BRATS_REGIONS, dice, mean_foreground_probability
    kind, _, arg = value.partition(":")
    kind = kind.strip().lower()
    if kind in ("probability", "prob"):
        try:
            k = int(arg or 1)
        except ValueError:
            raise InputError(f"--value probability:K needs an output channel index, got {arg!r}") from None
        return mean_foreground_probability(k, activation)
    if kind == "dice":
        if seg is None:
            raise InputError("--value dice:... needs the reference label map --seg")
        if not arg:
            raise InputError(f"--value dice needs a region or labels, e.g. dice:WT or dice:1 ({VALUE_HELP})")
        region = arg if arg.upper() in BRATS_REGIONS else [int(v) for v in arg.split("+")]
        return dice(region, seg, class_labels=class_labels, activation=activation,
                    channel=channel if activation != "softmax" else None)
    raise InputError(f"unknown --value {value!r}: {VALUE_HELP}")


def _write_csv(path: Path, header: list[str], rows: list[list]):
    from medexplain.io import atomic_path
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


@app.command("shapley")
def shapley_cmd(
    image: list[Path] = typer.Argument(..., help="one multi-contrast image (4D NIfTI with channels last, or .npy "
                                       "(C, *spatial)), or one file per contrast in the order of --contrasts"),
    model: list[str] = typer.Option(..., "--model", "-m", help="TorchScript file, package.module:factory, or "
                                    "zoo:<task>; repeat for fold models"),
    weights: list[str] = typer.Option([], "--weights", help="state dict per --model (package.module:factory models); "
                                      "repeat in the order of --model"),
    contrasts: Optional[str] = typer.Option(None, help="comma-separated contrast names, one per channel, "
                                            "e.g. T1,T1c,T2,FLAIR (default: channel 0, channel 1, ...)"),
    reference_ranking: Optional[str] = typer.Option(None, "--reference-ranking", help="contrasts most important "
                                                    "first (comma-separated), or ET, WT, TC, ED, NCR for the "
                                                    "clinician rankings of docs/shapley.md"),
    value: str = typer.Option("probability:1", help=VALUE_HELP),
    seg: Optional[Path] = typer.Option(None, help="reference label map (NIfTI/.npy) for dice values"),
    class_labels: Optional[str] = typer.Option(None, help="label of each output channel for dice, e.g. 0,1,2,4"),
    activation: str = typer.Option("softmax", help="softmax over output channels, or sigmoid (one channel per region)"),
    channel: Optional[int] = typer.Option(None, help="output channel of the region for sigmoid dice"),
    baseline: str = typer.Option("zero", help="absent contrasts: zero (the mean of z-scored input), mean, or a number"),
    method: str = typer.Option("auto", help="exact (all 2^n coalitions), permutation, or auto (exact up to 10)"),
    n_permutations: int = typer.Option(200, help="sampled orders for method=permutation"),
    seed: int = typer.Option(0),
    chunk_size: int = typer.Option(16, help="rows per forward pass"),
    out: Path = typer.Option(Path("medexplain_shapley"), help="output directory"),
):
    """Contrast-level Shapley values of IMAGE for each model; writes values.csv, coalitions.csv,
    ranking.json, agreement.json (with --reference-ranking) and uncertainty.json (two or more models).
    The image is fed to the models as read (normalise it as they were trained)."""
    import torch

    from medexplain import io
    from medexplain.errors import InputError, MedexplainError
    from medexplain.metrics.ranking import rank_agreement, rank_uncertainty, resolve_ranking
    from medexplain.models.loading import load_model
    from medexplain.shapley import channel_shapley

    try:
        img, meta = _read_channels(list(image))
        x = img[None]
        names = [c.strip() for c in contrasts.split(",")] if contrasts else [f"channel {i}" for i in range(x.shape[1])]
        if len(names) != x.shape[1]:
            raise InputError(f"--contrasts names {len(names)} contrasts; the image has {x.shape[1]} channels")
        if weights and len(weights) != len(model):
            raise InputError(f"{len(weights)} --weights for {len(model)} --model: give one per model (or none)")
        ref = None
        if reference_ranking:
            ref = resolve_ranking(reference_ranking, len(names), names)
        seg_t = None
        if seg is not None:
            s, _ = io.read_image(seg)
            seg_t = s[0].round().long()[None]
        labels = [int(v) for v in class_labels.split(",")] if class_labels else None
        if baseline in ("zero", "mean"):
            base = baseline
        else:
            try:
                base = float(baseline)
            except ValueError:
                raise InputError(f"--baseline must be zero, mean or a number, got {baseline!r}") from None
        vf = _value_fn(value, seg_t, labels, activation, channel)
        results = []
        for i, spec in enumerate(model):
            net = load_model(spec, weights[i] if weights else None)
            results.append(channel_shapley(net, x, vf, baseline=base, method=method, n_permutations=n_permutations,
                                           seed=seed, chunk_size=chunk_size, players=names))
            console.print(f"model {i + 1}/{len(model)}: {results[-1].n_evaluations} evaluations, "
                          f"{results[-1].info['seconds']:.2f} s")
    except MedexplainError as e:
        _fail(e)

    out.mkdir(parents=True, exist_ok=True)
    rows, crow = [], []
    for m, r in enumerate(results):
        for j, p in enumerate(names):
            se = "" if r.stderr is None else float(r.stderr[0, j])
            rows.append([m, model[m], p, float(r.values[0, j]), int(r.ranks[0, j]), se])
        for code, v in sorted(r.coalitions.items()):
            crow.append([m, code, "+".join(p for j, p in enumerate(names) if code >> j & 1), float(v[0])])
    _write_csv(out / "values.csv", ["model", "spec", "contrast", "shapley_value", "rank", "stderr"], rows)
    _write_csv(out / "coalitions.csv", ["model", "bitmask", "contrasts_present", "value"], crow)

    values = torch.cat([r.values for r in results])                 # (k, n): one row per model
    mean = values.mean(0)
    ranking = {"players": names, "value": value, "method": results[0].method,
               "per_model": [[names[j] for j in r.ranking[0].tolist()] for r in results],
               "mean_values": {p: float(mean[j]) for j, p in enumerate(names)},
               "consensus": [names[j] for j in torch.argsort(-mean, stable=True).tolist()],
               "n_evaluations": [r.n_evaluations for r in results], "image": [str(p) for p in image]}
    io.write_json(ranking, out / "ranking.json")
    written = ["values.csv", "coalitions.csv", "ranking.json"]
    if ref is not None:
        agr = rank_agreement(values, ref)
        per = [{k: float(v[m]) for k, v in agr.items()} for m in range(len(results))]
        io.write_json({"reference": [names[j] for j in ref], "per_model": per,
                       "mean": {k: float(torch.nanmean(v)) for k, v in agr.items()}}, out / "agreement.json")
        written.append("agreement.json")
    if len(results) > 1:
        per_player = rank_uncertainty(values[:, None], per_player=True)[0]
        io.write_json({"rank_variance": float(per_player.mean()), "n_models": len(results),
                       "per_contrast": {p: float(per_player[j]) for j, p in enumerate(names)},
                       "definition": "variance of each contrast's rank across the models (ddof=0), averaged"},
                      out / "uncertainty.json")
        written.append("uncertainty.json")

    table = Table(title=f"contrast Shapley values ({value})")
    table.add_column("contrast")
    for m in range(len(results)):
        table.add_column(f"model {m}", justify="right")
    for j, p in enumerate(names):
        table.add_row(p, *[f"{float(r.values[0, j]):+.4f} (#{int(r.ranks[0, j])})" for r in results])
    Console().print(table)
    console.print(f"wrote {', '.join(written)} to {out}")
