"""Planted-evidence generators on real anatomy (``docs/data.md``).

The labels are **planted**: real images (a chest radiograph, a fundus photograph, a T1 brain) supply the
background; a nodule, exudates, a marker or lesions are added at random positions that are recorded, so
the true location of the evidence is known for every sample. Every array is a deterministic function of
the seed (numpy ``SeedSequence([seed, generator_id])``; CPU torch resampling), so the same seed gives
byte-identical arrays and a different seed different positions.

Views of the anatomy are taken with one N-D affine resampling (:func:`_views`: crop, rotation, flips via
``affine_grid``/``grid_sample``), and blobs are planted with one N-D routine (:func:`_blob`), so the 2D and
3D generators share a code path.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medexplain.data import anatomy
from medexplain.data.dataset import PlantedDataset
from medexplain.errors import InputError

_IDS = {"chest_xray": 1, "fundus": 2, "lesion_volumes": 3, "contrast_volumes": 4}


def _rng(seed: int, name: str) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _IDS[name]]))


def _check(n: int, size: int, min_size: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < min_size:
        raise InputError(f"size must be an int >= {min_size}, got {size!r}")


def _views(base: torch.Tensor, size: int, crop: np.ndarray, center: np.ndarray, angle: np.ndarray,
           flip: np.ndarray, chunk: int = 256, padding: str = "reflection") -> torch.Tensor:
    """Resample ``n`` views of ``base`` ``(C, *S)`` onto ``(n, C, size, ..., size)``.

    Per view (array-axis order): ``crop`` (n, d) extent in input voxels, ``center`` (n, d) in normalised
    [-1, 1] input coordinates, ``angle`` (n,) rotation in radians in the plane of the last two axes, and
    ``flip`` (n, d) of +-1. Bilinear/trilinear, ``padding`` mode of grid_sample, align_corners=False.
    """
    d = base.ndim - 1
    ext = np.asarray(base.shape[1:], dtype=np.float64)
    n = crop.shape[0]
    out = []
    for sl in range(0, n, chunk):
        idx = np.arange(sl, min(sl + chunk, n))
        theta = np.zeros((len(idx), d, d + 1))
        for j, i in enumerate(idx):
            r = np.eye(d)
            c, s = math.cos(angle[i]), math.sin(angle[i])
            r[-2:, -2:] = [[c, -s], [s, c]]
            a = np.diag(1.0 / ext) @ r @ np.diag(crop[i] * flip[i])   # output [-1,1] -> input [-1,1]
            # affine_grid orders coordinates (x, y[, z]) = reversed array axes
            theta[j, :, :d] = a[::-1, ::-1]
            theta[j, :, d] = center[i][::-1]
        th = torch.from_numpy(theta).to(torch.float64)
        grid = F.affine_grid(th, [len(idx), base.shape[0], *([size] * d)], align_corners=False)
        src = base[None].to(torch.float64).expand(len(idx), *base.shape).contiguous()
        out.append(F.grid_sample(src, grid, mode="bilinear", padding_mode=padding, align_corners=False))
    return torch.cat(out).float()


def _coords(size: int, d: int) -> np.ndarray:
    """Voxel-centre coordinates ``(d, size, ..., size)`` in array-axis order."""
    return np.stack(np.meshgrid(*([np.arange(size, dtype=np.float64)] * d), indexing="ij"))


def _dist(coords: np.ndarray, center) -> np.ndarray:
    c = np.asarray(center, dtype=np.float64).reshape(-1, *[1] * (coords.ndim - 1))
    return np.sqrt(((coords - c) ** 2).sum(0))


def _blob(coords: np.ndarray, center, radius: float, edge: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A unit-peak blob and its mask ``d <= radius``.

    ``edge=None``: Gaussian with half maximum at ``radius`` (a faint nodule / exudate), truncated at
    2.5 radius. ``edge=w``: a plateau with a logistic rim of width ``w`` voxels at ``radius`` (a lesion).
    """
    dist = _dist(coords, center)
    if edge is None:
        prof = np.exp(-math.log(2.0) * (dist / radius) ** 2) * (dist <= 2.5 * radius)
    else:
        prof = 1.0 / (1.0 + np.exp(-(radius - dist) / edge))
    return prof, dist <= radius


def _place(rng, allowed: np.ndarray, radii, min_gap: float, tries: int = 200, jitter: float = 0.5) -> list:
    """Centres for blobs of ``radii`` on voxels where ``allowed`` (bool, array space), non-overlapping
    with ``min_gap`` voxels between supports; a sub-voxel offset of up to ``jitter``. A blob that finds no
    room in ``tries`` draws gets ``None`` (callers drop it), so planted blobs never touch."""
    cand = np.argwhere(allowed)
    if len(cand) == 0:
        raise InputError("no room to plant evidence: the image is too small for the requested blob radius")
    centres: list = []
    placed: list[tuple] = []
    for r in radii:
        found = None
        for _ in range(tries):
            c = cand[rng.integers(len(cand))] + rng.uniform(-jitter, jitter, size=cand.shape[1])
            if all(np.linalg.norm(c - np.asarray(q)) >= r + rq + min_gap for q, rq in placed):
                found = tuple(float(v) for v in c)
                break
        centres.append(found)
        if found is not None:
            placed.append((found, r))
    return centres


def _margin(size: int, d: int, m: float) -> np.ndarray:
    inner = np.zeros([size] * d, dtype=bool)
    lo, hi = int(math.ceil(m)), size - int(math.ceil(m))
    if hi <= lo:
        return inner
    inner[tuple([slice(lo, hi)] * d)] = True
    return inner


def _labels(rng, n: int, positive_fraction: float) -> np.ndarray:
    if not 0.0 <= positive_fraction <= 1.0:
        raise InputError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    k = int(round(n * positive_fraction))
    return rng.permutation(np.r_[np.zeros(n - k, np.int64), np.ones(k, np.int64)])


def chest_xray(n: int = 200, size: int = 64, seed: int = 0, shortcut: bool = False, *,
               amplitude: tuple[float, float] = (0.15, 0.25), radius: tuple[float, float] = (0.05, 0.085),
               positive_fraction: float = 0.5, marker_rate: tuple[float, float] | None = None,
               shortcut_nodule: float = 0.3, noise: float = 0.015) -> PlantedDataset:
    """2D classification: views of the real chest radiograph with a faint planted nodule in positives.

    Views: square crops of 30-60 % of the short side of ``RG1_UNCR.dcm`` at a random position,
    rotation +-10 degrees, random left-right flip, gamma/contrast/offset jitter, Gaussian noise.
    Positives (label 1) get one Gaussian blob (half maximum at the radius, ``radius`` x size pixels,
    peak ``amplitude`` on the [0, 1] intensity scale); ``masks`` = the disc inside the half-maximum radius.

    ``shortcut=True``: a bright square marker (laterality-marker style, side ~7 % of the image) near a
    random corner, present in every positive and no negative (``marker_rate`` = probability of a marker
    for (negatives, positives) overrides this), while the nodule is weak (``shortcut_nodule`` x
    amplitude). ``marker_masks`` record the square. A model trained on it can solve the task from the
    marker alone: a faithful explanation then points at the marker (MedicalPatchNet, section 1).
    """
    _check(n, size, 16)
    rng = _rng(seed, "chest_xray")
    labels = _labels(rng, n, positive_fraction)
    short = int(round(size / 0.3))
    base = anatomy.chest_radiograph(short)
    hw = np.asarray(base.shape[1:], dtype=np.float64)
    crop_px = rng.uniform(0.3, 0.6, n) * short
    half = crop_px[:, None] / hw[None] * 1.1                              # normalised half-extent (+ rotation room)
    centre = rng.uniform(-1, 1, (n, 2)) * np.clip(0.85 - half, 0.0, None)  # stay on the radiograph, off the edges
    angle = np.deg2rad(rng.uniform(-10, 10, n))
    flip = np.stack([np.ones(n), rng.choice([-1.0, 1.0], n)], 1)
    img = _views(base, size, np.stack([crop_px, crop_px], 1), centre, angle, flip).numpy().astype(np.float64)
    gamma, gain, off = rng.uniform(0.8, 1.25, n), rng.uniform(0.85, 1.15, n), rng.uniform(-0.05, 0.05, n)
    img = np.clip(img, 0, 1) ** gamma[:, None, None, None] * gain[:, None, None, None] + off[:, None, None, None]
    img += rng.normal(0.0, noise, img.shape)

    if marker_rate is None:
        marker_rate = (0.0, 1.0) if shortcut else (0.0, 0.0)
    coords = _coords(size, 2)
    masks = np.zeros((n, size, size), bool)
    markers = np.zeros((n, size, size), bool)
    meta = []
    side = max(3, int(round(0.07 * size)))
    for i in range(n):
        m = {"label": int(labels[i]), "nodules": [], "marker": None,
             "view": {"crop_px": float(crop_px[i]), "centre": centre[i].tolist(), "angle_deg": float(np.rad2deg(angle[i])),
                      "flip_lr": bool(flip[i, 1] < 0), "gamma": float(gamma[i]), "gain": float(gain[i]), "offset": float(off[i])}}
        if labels[i] == 1:
            r = float(rng.uniform(*radius) * size)
            a = float(rng.uniform(*amplitude)) * (shortcut_nodule if shortcut else 1.0)
            (c,) = _place(rng, _margin(size, 2, r + 2), [r], 0.0)  # a single blob always finds room
            prof, disc = _blob(coords, c, r)
            img[i, 0] += a * prof
            masks[i] = disc
            m["nodules"].append({"center": list(c), "radius": r, "amplitude": a})
        if rng.uniform() < marker_rate[int(labels[i])]:
            corner = int(rng.integers(4))
            gap = int(rng.integers(1, max(2, size // 16) + 1))
            y0 = gap if corner in (0, 1) else size - gap - side
            x0 = gap if corner in (0, 2) else size - gap - side
            img[i, 0, y0:y0 + side, x0:x0 + side] = 1.1
            markers[i, y0:y0 + side, x0:x0 + side] = True
            m["marker"] = {"corner": ["top-left", "top-right", "bottom-left", "bottom-right"][corner],
                           "box": [y0, x0, y0 + side, x0 + side]}
        meta.append(m)
    info = {"name": "chest_xray_shortcut" if shortcut else "chest_xray", "seed": seed, "size": size, "n": n,
            "task": "classification", "num_classes": 2, "class_names": ["normal", "nodule"],
            "channel_names": ["CR"], "source": "pydicom-data RG1_UNCR.dcm (real PA chest radiograph)",
            "planted": "faint nodule (Gaussian blob) in positives" + ("; bright corner marker in positives" if shortcut else ""),
            "shortcut": bool(shortcut), "marker_rate": list(marker_rate)}
    return PlantedDataset(images=torch.from_numpy(img.astype(np.float32)), masks=torch.from_numpy(masks),
                          marker_masks=torch.from_numpy(markers), meta=meta, meta_info=info,
                          labels=torch.from_numpy(labels))


def fundus(n: int = 200, size: int = 64, seed: int = 0, *, amplitude: tuple[float, float] = (0.25, 0.4),
           radius: tuple[float, float] = (0.03, 0.055), n_lesions: tuple[int, int] = (1, 3),
           positive_fraction: float = 0.5, noise: float = 0.01) -> PlantedDataset:
    """2D classification, 3 channels (RGB): views of the real fundus photograph (``skimage.data.retina``)
    with bright yellowish exudate-like lesions planted in positives (SSplain's setting).

    Views: 88-100 % crops around the disc centre, any rotation, random flip, per-channel gain and gamma,
    noise. Positives get ``n_lesions`` Gaussian spots inside the field of view, coloured
    ``(1, 0.85, 0.35)`` x amplitude; ``masks`` = union of their half-maximum discs.
    """
    _check(n, size, 16)
    rng = _rng(seed, "fundus")
    labels = _labels(rng, n, positive_fraction)
    side = int(round(size / 0.9))
    base = anatomy.retina(side)
    crop = rng.uniform(0.88, 1.0, n) * side
    centre = rng.uniform(-0.04, 0.04, (n, 2))
    angle = rng.uniform(0, 2 * np.pi, n)
    flip = np.stack([np.ones(n), rng.choice([-1.0, 1.0], n)], 1)
    img = _views(base, size, np.stack([crop, crop], 1), centre, angle, flip, padding="zeros").numpy().astype(np.float64)
    fov = img.mean(1) > 0.08
    gain, gamma = rng.uniform(0.9, 1.1, (n, 3)), rng.uniform(0.85, 1.15, n)
    img = np.clip(img, 0, 1) ** gamma[:, None, None, None] * gain[:, :, None, None]
    img += rng.normal(0.0, noise, img.shape)
    colour = np.array([1.0, 0.85, 0.35])
    coords = _coords(size, 2)
    masks = np.zeros((n, size, size), bool)
    meta = []
    for i in range(n):
        m = {"label": int(labels[i]), "lesions": [],
             "view": {"crop_px": float(crop[i]), "angle_deg": float(np.rad2deg(angle[i])), "flip": bool(flip[i, 1] < 0)}}
        if labels[i] == 1:
            k = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
            radii = [float(rng.uniform(*radius) * size) for _ in range(k)]
            room = ndimage.distance_transform_edt(fov[i]) > max(radii) + 2
            room &= _margin(size, 2, max(radii) + 2)
            for c, r in [(c, r) for c, r in zip(_place(rng, room, radii, 1.0), radii) if c is not None]:
                a = float(rng.uniform(*amplitude))
                prof, disc = _blob(coords, c, r)
                img[i] += a * colour[:, None, None] * prof[None]
                masks[i] |= disc
                m["lesions"].append({"center": list(c), "radius": r, "amplitude": a})
        meta.append(m)
    info = {"name": "fundus", "seed": seed, "size": size, "n": n, "task": "classification", "num_classes": 2,
            "class_names": ["normal", "exudates"], "channel_names": ["R", "G", "B"],
            "source": "scikit-image retina.jpg (real fundus photograph, CC0)",
            "planted": "bright yellowish exudate-like spots in positives"}
    return PlantedDataset(images=torch.from_numpy(img.astype(np.float32)), masks=torch.from_numpy(masks),
                          marker_masks=torch.zeros_like(torch.from_numpy(masks)), meta=meta, meta_info=info,
                          labels=torch.from_numpy(labels))


def _brain_views(rng, n: int, size: int):
    """Per-sample 3D views of nibabel's real T1 (crop 80-100 % per axis, random flips on every axis,
    +-8 degree in-plane rotation) -> T1-like ``t`` (n, size^3) and a brain mask."""
    base, _ = anatomy.brain_t1()
    ext = np.asarray(base.shape[1:], dtype=np.float64)
    crop = rng.uniform(0.8, 1.0, (n, 3)) * ext
    centre = rng.uniform(-1, 1, (n, 3)) * (1.0 - crop / ext) * 0.9
    angle = np.deg2rad(rng.uniform(-8, 8, n))
    flip = rng.choice([-1.0, 1.0], (n, 3))
    t = _views(base, size, crop, centre, angle, flip, chunk=16)[:, 0].numpy().astype(np.float64)
    brain = t > 0.3
    return t, brain, {"crop": crop, "centre": centre, "angle": angle, "flip": flip}


def _bias(rng, n: int, size: int, strength: float) -> np.ndarray:
    """A smooth multiplicative bias field per sample (linear ramp along a random direction)."""
    coords = _coords(size, 3) / max(size - 1, 1) - 0.5
    direc = rng.normal(size=(n, 3))
    direc /= np.linalg.norm(direc, axis=1, keepdims=True)
    return 1.0 + strength * np.einsum("nd,d...->n...", direc, coords)


def _contrast(t: np.ndarray, brain: np.ndarray, kind: str) -> np.ndarray:
    """Contrast-like channels derived from the same T1 anatomy (synthetic, not real acquisitions)."""
    if kind == "t1":
        return t
    if kind == "t1c":
        return np.clip(t, 0, None) ** 1.4
    if kind == "t2":   # fluid bright, white matter dark
        return np.clip(1.15 - t, 0, None) * (t > 0.08)
    if kind == "flair":  # grey matter brightest, fluid dark
        return (0.25 + 0.75 * np.exp(-((t - 0.55) / 0.22) ** 2)) * np.clip(t / 0.3, 0, 1)
    raise ValueError(kind)


def _lesions(rng, t, brain, size, n_lesions, radius, edge: float, amplitude=(0.6, 1.0)):
    """Plant non-overlapping lesions inside the brain: returns (profiles (n, *s), seg, instances, meta)."""
    n = t.shape[0]
    coords = _coords(size, 3)
    prof = np.zeros_like(t)
    inst = np.zeros(t.shape, np.int64)
    metas = []
    for i in range(n):
        k = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
        # radius >= 1 voxel and a centre within 0.25 voxel of a voxel centre: every lesion has voxels
        radii = sorted((max(1.0, float(rng.uniform(*radius) * size / 32.0)) for _ in range(k)), reverse=True)
        room = ndimage.binary_erosion(brain[i], iterations=1) & _margin(size, 3, max(radii) + 1)
        if not room.any():
            room = _margin(size, 3, max(radii) + 1)
        les = []
        placed = [(c, r) for c, r in zip(_place(rng, room, radii, 2.0, jitter=0.25), radii) if c is not None]
        for j, (c, r) in enumerate(placed, start=1):
            a = float(rng.uniform(*amplitude))
            p, ball = _blob(coords, c, r, edge=edge)
            prof[i] = np.maximum(prof[i], a * p)
            inst[i][ball & (inst[i] == 0)] = j
            les.append({"center": list(c), "radius": r, "amplitude": a, "voxels": int(ball.sum())})
        metas.append(les)
    return prof, inst > 0, inst, metas


def lesion_volumes(n: int = 8, size: int = 32, seed: int = 0, *, n_lesions: tuple[int, int] = (2, 5),
                   radius: tuple[float, float] = (1.3, 3.2), amplitude: tuple[float, float] = (0.6, 1.0),
                   noise: float = 0.03) -> PlantedDataset:
    """3D segmentation, 2 channels: channel 0 T1-like, channel 1 FLAIR-like, both derived from nibabel's
    real T1 (``anatomical.nii``, resampled with random crops/flips/rotation to ``size``^3, bias field and
    noise per channel). ``n_lesions`` hyperintense lesions of varied radius (``radius`` voxels at size 32,
    scaled with size; peak ``amplitude`` on the channel's [0, 1] scale, logistic rim) are planted in
    **channel 1 only**, inside the brain, separated by >= 2 voxels.
    ``seg`` = lesion label map (d <= radius), ``instances`` = lesion ids, ``masks`` = ``seg > 0``.
    The model should rely on channel 1: that is the check this set exists for (IES paper).
    """
    _check(n, size, 12)
    rng = _rng(seed, "lesion_volumes")
    t, brain, view = _brain_views(rng, n, size)
    prof, seg, inst, les = _lesions(rng, t, brain, size, n_lesions, radius, edge=0.35, amplitude=amplitude)
    chans = []
    for kind in ("t1", "flair"):
        c = _contrast(t, brain, kind) * _bias(rng, n, size, 0.2)
        chans.append(c + rng.normal(0.0, noise, c.shape))
    chans[1] = chans[1] + prof
    img = np.stack(chans, 1)
    meta = [{"lesions": les[i], "view": {k: v[i].tolist() for k, v in view.items()}} for i in range(n)]
    info = {"name": "lesion_volumes", "seed": seed, "size": size, "n": n, "task": "segmentation", "num_classes": 2,
            "channel_names": ["T1-like", "FLAIR-like"], "lesion_channel": 1,
            "source": "nibabel tests/data/anatomical.nii (real T1, 33x41x25)",
            "planted": "hyperintense lesions in channel 1 (FLAIR-like) only"}
    seg_t = torch.from_numpy(seg.astype(np.int64))
    return PlantedDataset(images=torch.from_numpy(img.astype(np.float32)), masks=torch.from_numpy(seg),
                          marker_masks=torch.zeros(seg.shape, dtype=torch.bool), meta=meta, meta_info=info,
                          seg=seg_t, instances=torch.from_numpy(inst))


def contrast_volumes(n: int = 8, size: int = 32, seed: int = 0, *,
                     visibility: tuple[float, float, float, float] = (0.0, 0.0, 0.35, 1.0),
                     n_lesions: tuple[int, int] = (2, 4), radius: tuple[float, float] = (1.6, 3.2),
                     noise: float = 0.05) -> PlantedDataset:
    """3D segmentation, 4 channels with a known per-channel importance (contrast-level Shapley).

    Channels are T1-like, T1c-like, T2-like and FLAIR-like contrasts derived from the same real T1 (each
    with its own bias field and noise). Lesions are added with amplitude ``visibility[c]`` x a (a in
    0.6-1) in channel c: by default strongly in channel 3, weakly in channel 2, not at all in 0 and 1.
    ``meta_info["true_ranking"] = [3, 2, 1, 0]`` (most to least important) with channels 0 and 1
    **tied** (``meta_info["ranking_ties"] = [[0, 1]]``: neither carries lesion signal, so their order is
    arbitrary and an agreement score should treat them as tied).
    """
    _check(n, size, 12)
    vis = np.asarray(visibility, dtype=np.float64)
    if vis.shape != (4,) or (vis < 0).any():
        raise InputError(f"visibility must be 4 non-negative numbers, got {visibility}")
    rng = _rng(seed, "contrast_volumes")
    t, brain, view = _brain_views(rng, n, size)
    prof, seg, inst, les = _lesions(rng, t, brain, size, n_lesions, radius, edge=0.35)
    chans = []
    for c, kind in enumerate(("t1", "t1c", "t2", "flair")):
        x = _contrast(t, brain, kind) * _bias(rng, n, size, 0.2)
        chans.append(x + rng.normal(0.0, noise, x.shape) + vis[c] * prof)
    img = np.stack(chans, 1)
    order = sorted(range(4), key=lambda c: (-vis[c], -c))
    ties = [g for g in ([c for c in range(4) if vis[c] == v] for v in sorted(set(vis.tolist()), reverse=True)) if len(g) > 1]
    meta = [{"lesions": les[i], "view": {k: v[i].tolist() for k, v in view.items()}} for i in range(n)]
    info = {"name": "contrast_volumes", "seed": seed, "size": size, "n": n, "task": "segmentation", "num_classes": 2,
            "channel_names": ["T1-like", "T1c-like", "T2-like", "FLAIR-like"], "visibility": vis.tolist(),
            "true_ranking": order, "ranking_ties": ties,
            "source": "nibabel tests/data/anatomical.nii (real T1, 33x41x25); other contrasts synthesised from it",
            "planted": "lesions with per-channel visibility " + str(vis.tolist())}
    return PlantedDataset(images=torch.from_numpy(img.astype(np.float32)), masks=torch.from_numpy(seg),
                          marker_masks=torch.zeros(seg.shape, dtype=torch.bool), meta=meta, meta_info=info,
                          seg=torch.from_numpy(seg.astype(np.int64)), instances=torch.from_numpy(inst))
