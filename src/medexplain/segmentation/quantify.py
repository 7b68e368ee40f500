"""Quantitative instance saliency: one table row per lesion, group statistics, the context experiment.

Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion segmentation"
(seed 001). Per instance ``L`` and input channel ``c`` with map ``S_c`` (raw, signed):

* ``sum_c = sum_{v in L} S_c(v)`` and ``mean_c`` (the same divided by |L|);
* ``channel_share_c = sum_v |S_c(v)| / sum_{c'} sum_v |S_c'(v)|`` over the whole map: the share of
  this lesion's saliency carried by channel ``c`` (e.g. FLAIR vs T1);
* ``inside_share_c = sum_{v in L} |S_c(v)| / sum_v |S_c(v)|``: how concentrated the channel's
  saliency is on the lesion;
* ``peak_c = max_{v in D^1(L)} S_c(v)``: the peak inside the lesion dilated by one voxel;
* ``ring{k}_c`` = mean of ``S_c`` over ``D^k(L) minus D^(k-1)(L)``, ``k = 0..R`` (``ring0`` = the lesion;
  ``D^k`` = k successive binary dilations with the instance connectivity). The paper finds positive
  saliency inside and negative saliency around a detected lesion.

:func:`group_statistics` compares TP / FP / FN rows with a Kruskal-Wallis test and pairwise two-sided
Mann-Whitney U tests, Bonferroni-corrected for the number of pairs tested (our choice; the paper reports no test).
:func:`context_experiment` keeps the input only inside the instance dilated ``d`` times (zero
elsewhere), ``d = 0..d_max``, and records the mean lesion probability over the instance and whether
any instance voxel is still above threshold (the reference's contextual-information experiment).
"""
from __future__ import annotations

import csv
import io as _io
import itertools
import math
import os

import numpy as np
import torch
from scipy import ndimage, stats

from medexplain.engine.core import check_input, chunks, forward, model_guard
from medexplain.engine.ops import probabilities
from medexplain.errors import InputError
from medexplain.io import atomic_path
from medexplain.models.model import as_model
from medexplain.segmentation.instances import KINDS, Instance, flatten_instances, structure


def _channel_names(c: int, names) -> list[str]:
    if names is None:
        return [f"ch{i}" for i in range(c)]
    names = [str(n) for n in names]
    if len(names) != c or len(set(names)) != c:
        raise InputError(f"channel_names must be {c} distinct names, got {names}")
    return names


def _dilations(mask: np.ndarray, n: int, struct: np.ndarray) -> list[np.ndarray]:
    """``[D^0, D^1, ..., D^n]`` of a boolean mask by successive dilations."""
    out = [mask]
    for _ in range(n):
        out.append(ndimage.binary_dilation(out[-1], structure=struct))
    return out


def quantify(instances, maps, rings: int = 5, connectivity=None, channel_names=None) -> list[dict]:
    """One row (a dict) per instance: identity, kind, size, and the per-channel measures of the module
    docstring. ``maps`` is ``(n_instances, C, *spatial)`` (what :func:`instance_saliency` returns, or
    an :class:`~medexplain.Attribution`) in the order of the flattened ``instances``; ``rings`` is R.
    Write the rows with :func:`write_csv`.
    """
    flat = flatten_instances(instances)
    maps = getattr(maps, "map", maps)
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(np.asarray(maps))
    if maps.ndim < 3 or maps.shape[0] != len(flat):
        raise InputError(f"maps must be (n_instances={len(flat)}, C, *spatial); got {tuple(maps.shape)}")
    if int(rings) < 0:
        raise InputError(f"rings must be >= 0, got {rings}")
    names = _channel_names(maps.shape[1], channel_names)
    m_np = maps.detach().cpu().double().numpy()
    rows = []
    for k, inst in enumerate(flat):
        mask = inst.mask.detach().cpu().numpy().astype(bool)
        if mask.shape != m_np.shape[2:]:
            raise InputError(f"instance {k} mask {mask.shape} does not match the map grid {m_np.shape[2:]}")
        struct = structure(mask.ndim, connectivity)
        dil = _dilations(mask, max(int(rings), 1), struct)
        row = {"instance": k + 1, "sample": inst.sample, "label": inst.label, "kind": inst.kind or "",
               "size": int(mask.sum()), "centroid": " ".join(f"{c:.1f}" for c in inst.centroid)}
        s = m_np[k]
        abs_tot = np.abs(s).reshape(s.shape[0], -1).sum(1)
        all_tot = abs_tot.sum()
        for c, name in enumerate(names):
            sc = s[c]
            inside = sc[mask]
            row[f"sum_{name}"] = float(inside.sum())
            row[f"mean_{name}"] = float(inside.mean())
            row[f"channel_share_{name}"] = float(abs_tot[c] / all_tot) if all_tot > 0 else math.nan
            row[f"inside_share_{name}"] = float(np.abs(inside).sum() / abs_tot[c]) if abs_tot[c] > 0 else math.nan
            row[f"peak_{name}"] = float(sc[dil[1]].max())
            for r in range(int(rings) + 1):
                ring = dil[r] & ~dil[r - 1] if r else dil[0]
                row[f"ring{r}_{name}"] = float(sc[ring].mean()) if ring.any() else math.nan
        rows.append(row)
    return rows


def group_statistics(rows: list[dict], columns=None, groups=KINDS, by: str = "kind") -> list[dict]:
    """TP / FP / FN comparison of numeric columns of :func:`quantify` rows: one dict per column with
    group sizes and medians, Kruskal-Wallis ``H`` and ``p`` over the groups, and for every pair of
    groups the Mann-Whitney U statistic, its two-sided p and the Bonferroni-corrected p (times the
    number of pairs tested, capped at 1). NaN values are ignored; a test that cannot run (fewer than
    two non-empty groups, or all values identical) gives NaN.
    """
    if not rows:
        raise InputError("group_statistics needs at least one row")
    if columns is None:
        skip = {"instance", "sample", "label", by}
        columns = [k for k, v in rows[0].items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    elif isinstance(columns, str):
        columns = [columns]
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise InputError(f"unknown column(s) {missing}; rows have {list(rows[0])}")
    groups = list(groups)
    out = []
    for col in columns:
        vals = {g: np.array([float(r[col]) for r in rows if r.get(by) == g], dtype=float) for g in groups}
        vals = {g: v[np.isfinite(v)] for g, v in vals.items()}
        res = {"column": col}
        for g in groups:
            res[f"n_{g}"] = int(len(vals[g]))
        for g in groups:
            res[f"median_{g}"] = float(np.median(vals[g])) if len(vals[g]) else math.nan
        present = [g for g in groups if len(vals[g])]
        h = p = math.nan
        if len(present) >= 2:
            try:
                h, p = stats.kruskal(*[vals[g] for g in present])
            except ValueError:  # all values identical
                pass
        res["kruskal_H"], res["kruskal_p"] = float(h), float(p)
        pairs = list(itertools.combinations(groups, 2))
        tested = [(a, b) for a, b in pairs if len(vals[a]) and len(vals[b])]
        for a, b in pairs:
            u = pu = math.nan
            if (a, b) in tested:
                u, pu = stats.mannwhitneyu(vals[a], vals[b], alternative="two-sided")
            res[f"U_{a}_{b}"] = float(u)
            res[f"p_{a}_{b}"] = float(pu)
            res[f"p_bonf_{a}_{b}"] = float(min(1.0, pu * len(tested))) if np.isfinite(pu) else math.nan
        out.append(res)
    return out


def context_experiment(model, x: torch.Tensor, instance, d_max: int = 10, channel: int = 1,
                       threshold: float = 0.5, connectivity=None, chunk_size: int | None = 4) -> list[dict]:
    """How much context does the model need to keep detecting a lesion? (the reference's experiment)

    For ``d = 0..d_max`` the input of the instance's image is kept only inside the instance dilated
    ``d`` times (every channel; zero elsewhere) and the model is run: one row per ``d`` with
    ``kept_voxels``, ``mean_probability`` (lesion probability averaged over the instance voxels, by the
    model's output activation, ``mx.Model(activation=)``: ``auto`` is softmax over several output channels of
    logits, or sigmoid for a one-channel output; :func:`medexplain.engine.ops.probabilities`) and ``detected``
    (some instance voxel still has probability > ``threshold``). ``instance`` may be a list: then one list
    of rows per instance. The ``d_max + 1`` inputs go through the model ``chunk_size`` rows per call; the
    model is left as found. ``model``: an :class:`mx.Model <medexplain.models.model.Model>` (its sliding
    window, passes, output adapter, activation and eval policy) or an ``nn.Module``, wrapped in one.
    """
    model = as_model(model)
    if not isinstance(instance, Instance):
        return [context_experiment(model, x, i, d_max, channel, threshold, connectivity, chunk_size)
                for i in flatten_instances(instance)]
    x = check_input(x)
    if int(d_max) < 0:
        raise InputError(f"d_max must be >= 0, got {d_max}")
    if not 0 <= instance.sample < x.shape[0]:
        raise InputError(f"the instance belongs to sample {instance.sample}; the input has {x.shape[0]} image(s)")
    mask = instance.mask.detach().cpu().numpy().astype(bool)
    if mask.shape != tuple(x.shape[2:]):
        raise InputError(f"instance mask {mask.shape} does not match the input grid {tuple(x.shape[2:])}")
    dil = _dilations(mask, int(d_max), structure(mask.ndim, connectivity))
    keep = torch.from_numpy(np.stack(dil)).to(x.device)                      # (d_max + 1, *s)
    inst = instance.mask.to(x.device)
    rows = []
    with model_guard(model), torch.no_grad():
        for sl in chunks(len(dil), chunk_size):
            xin = x[instance.sample].unsqueeze(0) * keep[sl].unsqueeze(1).to(x.dtype)
            out = forward(model, xin)
            if out.ndim != x.ndim or tuple(out.shape[2:]) != mask.shape:
                raise InputError(f"the model output {tuple(out.shape)} is not on the instance grid {mask.shape}")
            p = probabilities(out, model.activation, channel, model=model)[:, inst]               # (n, |L|)
            for j, d in enumerate(range(sl.start, sl.stop)):
                rows.append({"d": d, "kept_voxels": int(keep[d].sum()), "mean_probability": float(p[j].mean()),
                             "detected": bool((p[j] > threshold).any())})
    return rows


def write_csv(rows: list[dict], path) -> str:
    """Write rows (dicts; columns = union of keys in first-seen order) to ``path`` atomically."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    path = os.fspath(path)
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buf.getvalue(), newline="")
    return path


def markdown_table(rows: list[dict], columns=None, digits: int = 3) -> str:
    """A markdown table of rows (for reports and the benchmark)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
