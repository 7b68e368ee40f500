"""One training routine for every model in the project (zoo classifiers, 3D U-Nets, PatchNet).

AdamW + OneCycleLR (peak ``lr``, 5 % warm-up, as in the MedicalPatchNet paper's recipe), seeded, with a
Rich progress bar. Classification (``"ce"``, ``"bce"``) and segmentation (``"dice_ce"``: MONAI's
``DiceCELoss``, softmax over the class channel). Returns a history dict with the training loss per epoch
and the validation accuracy / AUROC (classification) or Dice (segmentation).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .io import atomic_path

__all__ = ["train", "evaluate", "auroc", "dice_score", "save_state_atomic"]


def _xy(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from a PlantedDataset (``images`` + ``labels`` or ``seg``) or a tuple (x, y)."""
    if isinstance(ds, (tuple, list)) and len(ds) == 2:
        x, y = ds
    elif hasattr(ds, "images"):
        x = ds.images
        y = ds.labels if getattr(ds, "labels", None) is not None else getattr(ds, "seg", None)
    else:
        raise InputError(f"training data must be a dataset with .images and .labels/.seg, or a tuple (x, y); got {type(ds).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError("training data must hold tensors (images, and labels or a segmentation map)")
    if x.ndim not in (4, 5) or y.shape[0] != x.shape[0]:
        raise InputError(f"images must be (N, C, *spatial) and targets (N, ...) with the same N; got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks). Multi-class ``scores`` (N, K)
    with ``labels`` (N,): mean one-vs-rest AUROC over the classes present; multi-label ``labels`` (N, K)
    of 0/1: mean over columns with both values. NaN when undefined."""
    s, y = scores.detach().double().cpu(), labels.detach().cpu()
    if s.ndim == 1:
        s, cols = s[:, None], y.long()[:, None]
    elif y.ndim == 1:
        cols = F.one_hot(y.long(), s.shape[1])
    else:
        cols = y.long()
    vals = []
    for k in range(s.shape[1]):
        pos = cols[:, k] == 1
        npos, nneg = int(pos.sum()), int((~pos).sum())
        if npos == 0 or nneg == 0:
            continue
        order = s[:, k].argsort()
        sorted_s = s[order, k]
        ranks = torch.empty_like(sorted_s)
        ranks[order] = torch.arange(1, len(sorted_s) + 1, dtype=torch.float64)
        for v in torch.unique(sorted_s):  # average tied ranks
            tie = s[:, k] == v
            if tie.sum() > 1:
                ranks[tie] = ranks[tie].mean()
        vals.append(float((ranks[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg)))
    return float(sum(vals) / len(vals)) if vals else float("nan")


def dice_score(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-case foreground Dice (mean over classes 1..K-1 present in target or prediction); 1.0 when both empty."""
    out = []
    for c in range(1, num_classes):
        p, t = (pred == c).flatten(1), (target == c).flatten(1)
        inter, tot = (p & t).sum(1).double(), (p.sum(1) + t.sum(1)).double()
        out.append(torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.ones_like(tot)))
    return torch.stack(out, 1).mean(1)


@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int = 64, task: str | None = None) -> dict:
    """Accuracy and AUROC (classification) or mean Dice (segmentation) of ``model`` on ``ds``, in eval
    mode; the model's ``training`` flag is restored."""
    x, y = _xy(ds)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        outs = torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)
    task = task or ("segmentation" if outs.ndim > 2 else "classification")
    if task == "segmentation":
        return {"dice": float(dice_score(outs.argmax(1), y, outs.shape[1]).mean())}
    if y.ndim == 2:  # multi-label
        pred = (outs > 0).long()
        return {"accuracy": float((pred == y.long()).float().mean()), "auroc": auroc(outs, y)}
    prob = outs.softmax(1) if outs.shape[1] > 1 else outs.sigmoid()
    pred = outs.argmax(1) if outs.shape[1] > 1 else (outs[:, 0] > 0).long()
    return {"accuracy": float((pred == y).float().mean()), "auroc": auroc(prob if prob.shape[1] > 2 else prob[:, -1], y)}


def save_state_atomic(model: nn.Module, path) -> str:
    """Write ``model.state_dict()`` to ``path`` atomically (temporary file in the same folder + os.replace)."""
    path = os.fspath(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return path


def _loss_fn(loss: str, num_out: int):
    if loss == "ce":
        return lambda out, y: F.cross_entropy(out, y.long())
    if loss == "bce":
        def bce(out, y):
            t = y.float() if y.ndim == out.ndim else (F.one_hot(y.long(), num_out).float() if num_out > 1 else y.float()[:, None])
            return F.binary_cross_entropy_with_logits(out, t)
        return bce
    if loss == "dice_ce":
        from monai.losses import DiceCELoss
        fn = DiceCELoss(to_onehot_y=True, softmax=True)
        return lambda out, y: fn(out, y.long().unsqueeze(1))
    raise InputError(f"unknown loss {loss!r}: use 'ce', 'bce' or 'dice_ce'")


def train(model: nn.Module, train_ds, val_ds=None, epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
          seed: int = 0, loss: str | None = None, augment: Callable | None = None, weight_decay: float = 1e-4,
          pct_start: float = 0.05, checkpoint=None, device=None, progress: bool = True,
          description: str = "training") -> dict:
    """Train ``model`` in place and return its history.

    Args:
        train_ds, val_ds: a :class:`medexplain.data.PlantedDataset` (or anything with ``.images`` and
            ``.labels``/``.seg``) or a tuple ``(x, y)``; ``y`` long ``(N,)`` class labels, ``(N, K)``
            multi-label 0/1 (with ``loss="bce"``) or ``(N, *spatial)`` label maps (segmentation).
        loss: ``"ce"``, ``"bce"`` (BCE-with-logits, one-hot for class labels) or ``"dice_ce"`` (MONAI
            DiceCELoss); default ``"dice_ce"`` for label maps, ``"ce"`` otherwise.
        augment: callable ``(x, y, generator) -> (x, y)`` applied to every training batch (``generator``
            is the seeded ``torch.Generator``; a callable of two arguments is also accepted).
        lr: the OneCycle peak learning rate (AdamW), warm-up ``pct_start`` of the steps.
        checkpoint: path; the state dict is written atomically after every epoch.
    Returns:
        ``{"loss": [...], "val_accuracy": [...], "val_auroc": [...]}`` or ``{"loss", "val_dice"}``, plus
        ``"seconds"``, ``"epochs"``, ``"steps"``. The model is left in eval mode.
    """
    x, y = _xy(train_ds)
    if epochs < 1 or batch_size < 1:
        raise InputError("epochs and batch_size must be >= 1")
    seg = y.ndim == x.ndim - 1
    loss = loss or ("dice_ce" if seg else "ce")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        was = model.training
        model.eval()
        n_out = model(x[:1].to(dev)).shape[1]
        model.train(was)
    crit = _loss_fn(loss, n_out)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=pct_start)
    aug_takes_gen = None
    hist: dict = {"loss": []}
    t0 = time.perf_counter()
    bar = _progress(progress)
    with bar as pbar:
        task_id = pbar.add_task(description, total=epochs * steps_per_epoch, info="") if pbar else None
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            tot, cnt = 0.0, 0
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                if augment is not None:
                    if aug_takes_gen is None:
                        import inspect
                        aug_takes_gen = len(inspect.signature(augment).parameters) >= 3
                    xb, yb = augment(xb, yb, gen) if aug_takes_gen else augment(xb, yb)
                xb, yb = xb.to(dev), yb.to(dev)
                opt.zero_grad(set_to_none=True)
                out = model(xb)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                lval = crit(out, yb)
                lval.backward()
                opt.step()
                sched.step()
                tot, cnt = tot + float(lval.detach()) * len(idx), cnt + len(idx)
                if pbar:
                    pbar.update(task_id, advance=1, info=f"epoch {ep + 1}/{epochs} loss {tot / cnt:.4f}")
            hist["loss"].append(tot / cnt)
            if val_ds is not None:
                for k, v in evaluate(model, val_ds, task="segmentation" if seg else "classification").items():
                    hist.setdefault(f"val_{k}", []).append(v)
                if pbar:
                    last = ", ".join(f"{k[4:]} {v[-1]:.3f}" for k, v in hist.items() if k.startswith("val_"))
                    pbar.update(task_id, info=f"epoch {ep + 1}/{epochs} loss {tot / cnt:.4f} val {last}")
            if checkpoint is not None:
                save_state_atomic(model, checkpoint)
    model.eval()
    hist.update(seconds=time.perf_counter() - t0, epochs=epochs, steps=epochs * steps_per_epoch, loss_name=loss)
    return hist


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
