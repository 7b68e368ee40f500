"""One training routine for every model in the project (zoo classifiers, 3D U-Nets, PatchNet), the one
weight-file format, and the reader of labelled image manifests.

AdamW + OneCycleLR (peak ``lr``, 5 % warm-up, as in the MedicalPatchNet paper's recipe), seeded, with a
Rich progress bar. Classification (``"ce"``, ``"bce"``) and segmentation (``"dice_ce"``: MONAI's
``DiceCELoss``, softmax over the class channel). Returns a history dict with the training loss per epoch
and the validation accuracy / AUROC (classification) or Dice (segmentation).

Models whose output is a tuple, a dict or stacked deep-supervision heads are trained and evaluated on the
output chosen by ``output=`` (:func:`medexplain.engine.core.select_output`, the adapter every explainer uses).

Weights are written in one format (:func:`save_weights`): ``torch.save`` of a dict with ``format``
(:data:`WEIGHTS_FORMAT`), ``state_dict`` and metadata, always atomically (:func:`medexplain.io.atomic_path`).
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medexplain.engine.core import DEEP_SUPERVISION_HINT, Passes, model_guard, resolve_device, select_output
from medexplain.engine.ops import dice
from medexplain.errors import FileFormatError, InputError, ModelLoadError
from medexplain.io import atomic_path, check_output_dir, read_image

__all__ = ["train", "evaluate", "auroc", "dice_score", "save_weights", "read_weights", "WEIGHTS_FORMAT",
           "TrainingData", "read_training_manifest"]

#: The ``format`` entry of every weight file medexplain writes (training checkpoints, the zoo cache,
#: ``medexplain train`` folders).
WEIGHTS_FORMAT = "medexplain-weights/1"


def _xy(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from a PlantedDataset (``images`` + ``labels`` or ``seg``) or a tuple (x, y)."""
    if isinstance(ds, (tuple, list)) and len(ds) == 2:
        x, y = ds
    elif hasattr(ds, "images"):
        x = ds.images
        y = ds.labels if getattr(ds, "labels", None) is not None else getattr(ds, "seg", None)
    else:
        raise InputError("training data must be a dataset with .images and .labels/.seg, or a tuple (x, y); "
                         f"got {type(ds).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError("training data must hold tensors (images, and labels or a segmentation map)")
    if x.ndim not in (4, 5) or y.shape[0] != x.shape[0]:
        raise InputError("images must be (N, C, *spatial) and targets (N, ...) with the same N; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
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
    """Per-case foreground Dice of label maps: the mean over classes 1..K-1 of :func:`medexplain.engine.ops.dice`
    (1.0 for a class absent from both target and prediction)."""
    return torch.stack([dice(pred == c, target == c, empty=1.0) for c in range(1, num_classes)], 1).mean(1)


@torch.no_grad()
def evaluate(model, ds, batch_size: int = 64, task: str | None = None) -> dict:
    """Accuracy and AUROC (classification) or mean Dice (segmentation) of ``model`` on ``ds``: an
    :class:`mx.Model <medexplain.models.model.Model>` (its output adapter ``output=``, passes, sliding window,
    device and train/eval policy: a model entirely in training mode is evaluated in eval mode), or an
    ``nn.Module``, run as the one pass of a Model (:class:`medexplain.engine.core.Passes`, the default output adapter;
    the model loaders import this module, so it builds no ``mx.Model`` itself). The model is left as found."""
    x, y = _xy(ds)
    net = model if hasattr(model, "predict") and hasattr(model, "eval_policy") else Passes([model])
    dev = next((t.device for t in (*net.parameters(), *net.buffers())), torch.device("cpu"))
    with model_guard(net):   # the Model's policy, else "auto"; modes, requires_grad and buffers restored
        outs = torch.cat([net(x[i:i + batch_size].to(dev)).detach().float().cpu()
                          for i in range(0, len(x), batch_size)])
    task = task or ("segmentation" if outs.ndim > 2 else "classification")
    if task == "segmentation":
        return {"dice": float(dice_score(outs.argmax(1), y, outs.shape[1]).mean())}
    if y.ndim == 2:  # multi-label
        pred = (outs > 0).long()
        return {"accuracy": float((pred == y.long()).float().mean()), "auroc": auroc(outs, y)}
    prob = outs.softmax(1) if outs.shape[1] > 1 else outs.sigmoid()
    pred = outs.argmax(1) if outs.shape[1] > 1 else (outs[:, 0] > 0).long()
    return {"accuracy": float((pred == y).float().mean()), "auroc": auroc(prob if prob.shape[1] > 2 else prob[:, -1], y)}


def save_weights(model: nn.Module, path, **metadata) -> Path:
    """Write ``model``'s weights in the one medexplain format, atomically: ``torch.save`` of
    ``{"format": WEIGHTS_FORMAT, "state_dict": {name: CPU tensor}, **metadata}`` (metadata: plain
    Python values, e.g. ``history``, ``config``, ``epoch``, so ``torch.load(weights_only=True)`` reads it)."""
    if "format" in metadata or "state_dict" in metadata:
        raise InputError("save_weights metadata may not be named 'format' or 'state_dict'")
    blob = {"format": WEIGHTS_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **metadata}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(blob, tmp)
    return Path(path)


#: The entries training codes save a model's state dict under, tried in this order (PyTorch Lightning and
#: most loops: ``state_dict``; the PyTorch tutorial: ``model_state_dict``; ``model``; nnU-Net: ``network_weights``).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "network_weights")
#: The prefix ``nn.DataParallel`` / ``DistributedDataParallel`` put on every key of a wrapped model's state dict.
PARALLEL_PREFIX = "module."


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def read_weights(path, map_location="cpu") -> dict:
    """``{"state_dict": ..., **metadata}`` of a weight file, read with ``weights_only=True``.

    The kinds are told apart by their content, not guessed: a medexplain file (:func:`save_weights`: its
    ``format`` is :data:`WEIGHTS_FORMAT`); a plain state dict (every value a tensor: what
    ``torch.save(model.state_dict())`` writes); a training checkpoint holding the state dict under one of
    :data:`CHECKPOINT_KEYS` next to other entries (``epoch``, the optimizer state, ...), whose key is returned
    as ``weights_key`` and its other entries as ``other_keys``. A state dict whose every key starts with
    ``module.`` (saved from ``nn.DataParallel``) has the prefix removed (``stripped_prefix``). Anything else is
    a :class:`~medexplain.errors.ModelLoadError` naming its keys.
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load weights ({type(e).__name__}: {e})") from e
    if isinstance(blob, dict) and blob.get("format") == WEIGHTS_FORMAT and isinstance(blob.get("state_dict"), dict):
        return {k: v for k, v in blob.items() if k != "format"}
    if _is_state_dict(blob):
        out = {"state_dict": blob}
    else:
        key = next((k for k in CHECKPOINT_KEYS if isinstance(blob, dict) and _is_state_dict(blob.get(k))), None)
        if key is None:
            what = (f"a dict with keys {sorted(map(str, blob))[:8]}" if isinstance(blob, dict)
                    else f"a {type(blob).__name__}")
            raise ModelLoadError(f"{path}: {what}: neither a state dict (torch.save(model.state_dict())), nor a "
                                 f"checkpoint with the state dict under one of {list(CHECKPOINT_KEYS)}, nor a "
                                 f"medexplain weight file ({WEIGHTS_FORMAT}); save the model's state_dict()")
        out = {"state_dict": blob[key], "weights_key": key, "other_keys": sorted(str(k) for k in blob if k != key)}
    sd = out["state_dict"]
    if all(isinstance(k, str) and k.startswith(PARALLEL_PREFIX) for k in sd):
        out.update(state_dict={k[len(PARALLEL_PREFIX):]: v for k, v in sd.items()}, stripped_prefix=PARALLEL_PREFIX)
    return out


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
          description: str = "training", output=None) -> dict:
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
        checkpoint: path; the weights are written after every epoch (:func:`save_weights`, with
            ``epoch`` and ``history``).
        output: the output trained on, for models returning a tuple, a dict or stacked heads
            (:func:`medexplain.engine.core.select_output`; applied in training and in eval mode alike: for MONAI
            ``DynUNet``, which stacks its heads in training mode only, :data:`medexplain.engine.core.DEEP_SUPERVISION_HINT`).
    Returns:
        ``{"loss": [...], "val_accuracy": [...], "val_auroc": [...]}`` or ``{"loss", "val_dice"}``, plus
        ``"seconds"``, ``"epochs"``, ``"steps"``. The model is left in eval mode.
    """
    x, y = _xy(train_ds)
    if epochs < 1 or batch_size < 1:
        raise InputError("epochs and batch_size must be >= 1")
    if checkpoint is not None:  # its folder can be created and written, before the first epoch (issue 27)
        check_output_dir(Path(checkpoint).parent)
    seg = y.ndim == x.ndim - 1
    loss = loss or ("dice_ce" if seg else "ce")
    dev = resolve_device(device) or next(model.parameters()).device   # auto, cpu, cuda[:N] (core.resolve_device)
    model.to(dev)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            probe = select_output(model(x[:1].to(dev)), output, x.ndim)
        finally:
            model.train(was)
    _check_output(probe, x[:1], seg, "eval")
    n_out = probe.shape[1]
    crit = _loss_fn(loss, n_out)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    if abs(pct_start * total - 1) < 1e-9:  # torch's OneCycleLR divides by zero for a warm-up of exactly one step
        pct_start = 2 / total
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=pct_start)
    aug_takes_gen = None if augment is None else len(inspect.signature(augment).parameters) >= 3
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
                    xb, yb = augment(xb, yb, gen) if aug_takes_gen else augment(xb, yb)
                xb, yb = xb.to(dev), yb.to(dev)
                opt.zero_grad(set_to_none=True)
                out = select_output(model(xb), output, xb.ndim)
                if ep == 0 and s == 0:
                    _check_output(out, xb, seg, "training")
                lval = crit(out, yb)
                lval.backward()
                opt.step()
                sched.step()
                tot, cnt = tot + float(lval.detach()) * len(idx), cnt + len(idx)
                if pbar:
                    pbar.update(task_id, advance=1, info=f"epoch {ep + 1}/{epochs} loss {tot / cnt:.4f}")
            hist["loss"].append(tot / cnt)
            if val_ds is not None:
                for k, v in evaluate(Passes([model], output=output), val_ds,
                                     task="segmentation" if seg else "classification").items():
                    hist.setdefault(f"val_{k}", []).append(v)
                if pbar:
                    last = ", ".join(f"{k[4:]} {v[-1]:.3f}" for k, v in hist.items() if k.startswith("val_"))
                    pbar.update(task_id, info=f"epoch {ep + 1}/{epochs} loss {tot / cnt:.4f} val {last}")
            if checkpoint is not None:
                save_weights(model, checkpoint, epoch=ep + 1, history={k: list(v) for k, v in hist.items()})
    model.eval()
    hist.update(seconds=time.perf_counter() - t0, epochs=epochs, steps=epochs * steps_per_epoch, loss_name=loss)
    return hist


def _check_output(out: torch.Tensor, xb: torch.Tensor, seg: bool, mode: str) -> None:
    """A typed error, before the loss or the metric fails obscurely, when the output chosen by ``output=``
    is not ``(B, K)`` (classification) or ``(B, K, *spatial)`` (segmentation) in ``mode`` (training / eval)."""
    want = xb.ndim if seg else 2
    if out.ndim != want or out.shape[0] != xb.shape[0]:
        raise InputError(
            f"in {mode} mode the model's output (after output=) has shape {tuple(out.shape)} for a batch "
            f"{tuple(xb.shape)}; training needs {'(B, K, *spatial)' if seg else '(B, K)'}. Choose what is trained "
            "with output= (a deep-supervision model such as MONAI DynUNet stacks its heads on dim 1 in training "
            f"mode only: {DEEP_SUPERVISION_HINT})")


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


@dataclass
class TrainingData:
    """Labelled images split for training: ``train`` and ``val`` are ``(x, y)`` tuples as :func:`train`
    takes them; ``class_names`` one per output; ``multilabel`` when ``y`` is ``(N, K)`` 0/1."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    class_names: list[str]
    multilabel: bool = False


def read_training_manifest(path, image_size: int, seed: int = 0, val_frac: float = 0.2) -> TrainingData:
    """A labelled image manifest CSV as :class:`TrainingData`.

    Columns: ``path`` (image files relative to the CSV's folder, read with :func:`medexplain.io.read_image`;
    2D only), either one integer ``label`` column (single-label) or several 0/1 columns (multi-label,
    their names are the class names), and optionally ``split`` (``train`` / ``val``; without it a seeded
    random ``val_frac`` of the rows is the validation set). Images are resized to ``image_size`` squared
    (bilinear, antialiased) and scaled to [0, 1] per image (MedicalPatchNet scales intensities to [0, 1]).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such manifest")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise FileFormatError(f"{path}: a manifest needs a 'path' column and label column(s)")
    label_cols = [c for c in rows[0] if c not in ("path", "split")]
    if not label_cols:
        raise FileFormatError(f"{path}: no label column")
    multilabel = label_cols != ["label"]
    xs, ys = [], []
    for r in rows:
        xs.append(_manifest_image(path.parent / r["path"], r["path"], image_size))
        try:
            ys.append([float(r[c]) for c in label_cols] if multilabel else int(r["label"]))
        except ValueError as e:
            raise FileFormatError(f"{path}: bad label in row {r}: {e}") from None
    if len({x.shape[0] for x in xs}) != 1:
        raise InputError(f"{path}: images have different channel counts")
    x = torch.stack(xs)
    y = torch.tensor(ys, dtype=torch.float32 if multilabel else torch.long)
    val = _validation_rows(rows, seed, val_frac)
    if val.all() or not val.any():
        raise InputError(f"{path}: need both training and validation rows")
    names = label_cols if multilabel else [str(c) for c in range(int(y.max()) + 1)]
    return TrainingData((x[~val], y[~val]), (x[val], y[val]), names, multilabel)


def _manifest_image(file: Path, name: str, image_size: int) -> torch.Tensor:
    img, _ = read_image(file)
    if img.ndim != 3:
        raise InputError(f"{name}: training from a manifest takes 2D images, got shape {tuple(img.shape)}")
    img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    lo, hi = img.amin(), img.amax()
    return (img - lo) / (hi - lo).clamp_min(1e-12)


def _validation_rows(rows: list[dict], seed: int, val_frac: float) -> torch.Tensor:
    if "split" in rows[0]:
        return torch.tensor([r["split"].strip().lower() in ("val", "valid", "validation") for r in rows])
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(rows), dtype=torch.bool)
    val[torch.randperm(len(rows), generator=g)[:max(1, int(round(val_frac * len(rows))))]] = True
    return val
