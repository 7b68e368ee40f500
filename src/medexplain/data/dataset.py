"""The container every planted-evidence generator returns (see ``docs/data.md``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from medexplain.errors import InputError


@dataclass
class PlantedDataset:
    """Images on real anatomy with evidence planted at recorded positions.

    The labels are **planted**, not diagnostic: the only thing that separates the classes (or defines a
    lesion) is the signal the generator added, and ``masks`` records exactly where it is.

    Attributes:
        images: float32 ``(N, C, *spatial)``.
        labels: long ``(N,)`` for classification sets, ``None`` for segmentation sets.
        seg: long ``(N, *spatial)`` label map (0 background, 1 lesion) for segmentation sets, else ``None``.
        masks: bool ``(N, *spatial)``: where the planted evidence is (empty for negatives).
        marker_masks: bool ``(N, *spatial)``: where a shortcut marker is (all empty without one).
        instances: long ``(N, *spatial)``: planted instance ids (0 background, 1..k), or ``None``.
        meta: one dict per sample (positions, radii, amplitudes, view parameters).
        meta_info: dataset-level facts (name, seed, task, channel names, true ranking, ...).
    """

    images: torch.Tensor
    masks: torch.Tensor
    marker_masks: torch.Tensor
    meta: list
    meta_info: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    seg: torch.Tensor | None = None
    instances: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def task(self) -> str:
        return "classification" if self.labels is not None else "segmentation"

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def targets(self) -> torch.Tensor:
        """What a model is trained on: ``labels`` (classification) or ``seg`` (segmentation)."""
        return self.labels if self.labels is not None else self.seg

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "mask": self.masks[i], "marker_mask": self.marker_masks[i], "meta": self.meta[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if self.seg is not None:
            item["seg"] = self.seg[i]
        return item

    def subset(self, index) -> "PlantedDataset":
        """The samples at ``index`` (a list, slice or index tensor), in that order."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise InputError(f"subset index out of range for a dataset of {len(self)} samples")
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(self, images=self.images[idx], masks=self.masks[idx], marker_masks=self.marker_masks[idx],
                       labels=pick(self.labels), seg=pick(self.seg), instances=pick(self.instances),
                       meta=[self.meta[int(i)] for i in idx], meta_info=dict(self.meta_info))

    def split(self, frac: float = 0.8) -> tuple["PlantedDataset", "PlantedDataset"]:
        """Deterministic (train, test) split. Classification sets are stratified: the first ``frac`` of each
        class's samples (in dataset order) go to train. Segmentation sets: the first ``frac`` of the samples."""
        if not 0.0 < frac < 1.0:
            raise InputError(f"split fraction must be in (0, 1), got {frac}")
        if self.labels is None:
            k = min(max(int(round(frac * len(self))), 1), len(self) - 1)
            return self.subset(slice(0, k)), self.subset(slice(k, len(self)))
        train, test = [], []
        for c in torch.unique(self.labels).tolist():
            idx = (self.labels == c).nonzero().flatten()
            k = int(round(frac * idx.numel()))
            train.append(idx[:k])
            test.append(idx[k:])
        train, test = torch.cat(train).sort().values, torch.cat(test).sort().values
        return self.subset(train), self.subset(test)

    def __repr__(self) -> str:
        extra = f", labels={torch.bincount(self.labels).tolist()}" if self.labels is not None else ""
        return (f"PlantedDataset({self.meta_info.get('name', '?')}: {len(self)} x {tuple(self.images.shape[1:])}"
                f"{extra}, planted evidence)")
