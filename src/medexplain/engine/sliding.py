"""Explanations through sliding-window inference (MONAI's ``SlidingWindowInferer``), window by window.

Full-resolution 3D segmenters are run as MONAI's ``sliding_window_inference`` runs them: the input is cut
into ROI windows ``x_w = P_w^T x`` (``P_w`` places window ``w`` in the image), every window goes through the
network ``f``, and the outputs are blended with an importance map ``g`` (constant or Gaussian)::

    O = sum_w P_w(g * f(x_w)) / c,        c = sum_w P_w(g)                                        (1)

For a target score ``s(O)`` the chain rule gives the input gradient as a sum of one vector-Jacobian
product per window::

    ds/dx = sum_w P_w VJP_f(x_w)[ g * (P_w^T ds/dO) / (P_w^T c) ]                                  (2)

:class:`SlidingWindowModel` is an ``nn.Module`` whose forward is (1), computed by MONAI's own inferer
(``inferer(x, predictor)``, so the output *is* MONAI's, settings and all) without an autograd graph, and
whose backward is (2): windows whose cotangent ``P_w^T ds/dO`` is zero are skipped, and each remaining
window is recomputed with a graph and backpropagated on its own (gradient checkpointing per window, the
recipe of Chen et al. 2016, "Training deep nets with sublinear memory cost"), ``sw_batch_size`` windows at
a time. Only one batch of windows' activations is alive at a time, and a target that touches a few
windows (a lesion) costs a few window backward passes, not the whole inference. A target that needs the
whole output (a softmax over the predicted region) is handled by the same path: autograd runs the
no-graph forward (1) once, computes ``ds/dO``, then calls (2).

The window positions (``dense_patch_slices`` with ``_get_scan_interval``), the importance map
(``compute_importance_map``, or the inferer's cached ``roi_weight_map``) and the ROI fallback
(``fall_back_tuple``) are MONAI's own helpers; what is written here is only what the gradient (2) and the
partial re-blending of :meth:`SlidingWindowModel.forward_changed` need: the count map ``c``, the padding
when the ROI is larger than the image (as ``sliding_window_inference`` pads), and the loop over windows.
No library offers a window-by-window backward: autograd through ``sliding_window_inference`` keeps every
window's activations alive at once and backpropagates through every window.

``mx.explain(mx.Model(model, inferer=SlidingWindowInferer(...)), x, method, target)`` wraps the model once
(:func:`with_inferer`); every gradient method runs unchanged through it, and ``info`` then counts windows:
``n_forward`` / ``n_backward`` are window rows through the model (one ``roi_size`` window counts one),
``windows`` the indices (in MONAI's window order) of the windows that were backpropagated and
``n_windows`` the windows per image. Perturbation methods run the no-graph forward (1); occlusion calls
:func:`forward_changed`, which re-runs only the windows an occluder touches. ``docs/sliding_window.md``
describes the design and the bench.
"""
from __future__ import annotations

import math
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medexplain.engine.core import Cost, OutputAdapter, chunks, forward, n_passes, select_output, storage_key, with_output
from medexplain.errors import InputError, UnsupportedModelError

__all__ = ["SlidingWindowModel", "WindowGeometry", "with_inferer", "forward_changed", "make_inferer", "as_inferer",
           "is_sliding", "window_info"]


def _monai():
    """MONAI's sliding-window helpers, imported when an inferer is used (MONAI's import costs seconds)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
    from monai.inferers import SlidingWindowInferer
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep, fall_back_tuple
    return dict(SlidingWindowInferer=SlidingWindowInferer, compute_importance_map=compute_importance_map,
                dense_patch_slices=dense_patch_slices, get_valid_patch_size=get_valid_patch_size,
                scan_interval=_get_scan_interval, ensure_tuple_rep=ensure_tuple_rep, fall_back_tuple=fall_back_tuple)


def make_inferer(roi_size, overlap: float = 0.25, sw_batch_size: int = 1, mode: str = "constant", **settings):
    """A ``monai.inferers.SlidingWindowInferer`` from plain values (what the command line gives), or
    ``None`` when ``roi_size`` is None. ``roi_size``: an int or one int per spatial axis."""
    if roi_size is None:
        return None
    roi = [int(r) for r in roi_size] if isinstance(roi_size, (list, tuple)) else int(roi_size)
    if min(roi if isinstance(roi, list) else [roi]) < 1:
        raise InputError(f"roi_size must be positive, got {roi_size!r}")
    if not 0 <= float(overlap) < 1:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if int(sw_batch_size) < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ("constant", "gaussian"):
        raise InputError(f"sliding-window mode must be 'constant' or 'gaussian', got {mode!r}")
    return _monai()["SlidingWindowInferer"](roi_size=roi, sw_batch_size=int(sw_batch_size), overlap=float(overlap),
                                             mode=mode, **settings)


def as_inferer(inferer):
    """``None``, a ``SlidingWindowInferer`` as is, or one built from its settings given as a dict
    (``roi_size``, ``overlap``, ``sw_batch_size``, ``mode``: what the command line gives); a dict whose
    ``roi_size`` is None means no inferer."""
    if inferer is None or not isinstance(inferer, dict):
        return inferer
    known = {"roi_size", "overlap", "sw_batch_size", "mode"}
    if set(inferer) - known:
        raise InputError(f"sliding-window settings {sorted(set(inferer) - known)} unknown; use {sorted(known)}")
    return make_inferer(**{k: v for k, v in inferer.items() if v is not None or k == "roi_size"})


@dataclass
class WindowGeometry:
    """Where the windows of an image of shape ``spatial`` lie, as ``sliding_window_inference`` places them.

    ``image``: the (padded) grid the windows tile; ``pad``: the ``F.pad`` amounts (last axis first, as
    MONAI pads when the ROI is larger than the image); ``slices``: one tuple of slices per window, in
    MONAI's order; ``importance``: ``g`` as ``(1, 1, *roi)``; :attr:`count`: ``c = sum_w P_w(g)`` as
    ``(1, 1, *image)``, built when first asked for (the gradient reads it one window at a time,
    :meth:`count_in`, and never holds the full-volume map).
    """

    spatial: tuple[int, ...]
    roi: tuple[int, ...]
    image: tuple[int, ...]
    pad: list[int]
    slices: list[tuple[slice, ...]]
    importance: torch.Tensor
    padding_mode: str = "constant"
    cval: float = 0.0
    _count: torch.Tensor | None = field(default=None, repr=False)

    @property
    def count(self) -> torch.Tensor:
        """``c = sum_w P_w(g)`` on the padded grid ``(1, 1, *image)`` (eq. 1), built once."""
        if self._count is None:
            g = self.importance
            count = torch.zeros((1, 1, *self.image), dtype=g.dtype, device=g.device)
            for sl in self.slices:
                count[(slice(None), slice(None), *sl)] += g
            self._count = count
        return self._count

    def count_in(self, w: int) -> torch.Tensor:
        """``P_w^T c``, the count map over window ``w`` ``(1, 1, *roi)``, from the windows that overlap it: the
        same additions in the same (MONAI's window) order as :attr:`count`, so bit-identical to
        ``count[window w]``, without a full-volume array (the one-window memory budget)."""
        if self._count is not None:
            return self._count[(slice(None), slice(None), *self.slices[w])]
        own, g = self.slices[w], self.importance
        c = torch.zeros((1, 1, *self.roi), dtype=g.dtype, device=g.device)
        for sl in self.slices:
            lo = [max(a.start, b.start) for a, b in zip(own, sl)]
            hi = [min(a.stop, b.stop) for a, b in zip(own, sl)]
            if all(lo_ < hi_ for lo_, hi_ in zip(lo, hi)):
                c[(slice(None), slice(None), *(slice(l_ - a.start, h_ - a.start) for l_, h_, a in zip(lo, hi, own)))] += \
                    g[(slice(None), slice(None), *(slice(l_ - b.start, h_ - b.start) for l_, h_, b in zip(lo, hi, sl)))]
        return c

    @property
    def padded(self) -> bool:
        return any(self.pad)

    def before(self, d: int) -> int:
        """Padding before spatial axis ``d``."""
        return self.pad[2 * (len(self.spatial) - 1 - d)]

    @property
    def crop(self) -> tuple[slice, ...]:
        """The original image inside the padded grid."""
        return tuple(slice(self.before(d), self.before(d) + s) for d, s in enumerate(self.spatial))

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded as MONAI pads it (differentiable)."""
        if not self.padded:
            return x
        return F.pad(x, self.pad, mode=self.padding_mode, value=self.cval) if self.padding_mode == "constant" \
            else F.pad(x, self.pad, mode=self.padding_mode)

    def pad_output(self, t: torch.Tensor) -> torch.Tensor:
        """An output-grid tensor placed in the padded grid, zero outside (where no output is returned)."""
        return F.pad(t, self.pad) if self.padded else t

    def touching(self, box: Sequence[slice]) -> list[int]:
        """Windows that intersect ``box`` (slices on the original grid). With a non-constant padding mode,
        a change near a padded border also changes the padded voxels, so such axes count as changed
        over their whole padded length."""
        padded_box = []
        for d, sl in enumerate(box):
            lo, hi, _ = sl.indices(self.spatial[d])
            if self.padding_mode != "constant" and self.before(d) + self.pad[2 * (len(self.spatial) - 1 - d) + 1]:
                lo, hi = 0, self.image[d]
            else:
                lo, hi = lo + self.before(d), hi + self.before(d)
            padded_box.append((lo, hi))
        return [w for w, sl in enumerate(self.slices)
                if all(s.start < hi and lo < s.stop for s, (lo, hi) in zip(sl, padded_box))]


@dataclass
class WindowStats:
    """Windows through the model during one explanation (one ``roi_size`` window counts one row)."""

    n_forward: int = 0
    n_backward: int = 0
    windows: set = field(default_factory=set)
    n_windows: int = 0
    kept: int = 0            # window rows whose graph was kept from the forward (backpropagated without recompute)
    recomputed: int = 0      # window rows recomputed with a graph for the backward
    window_bytes: int = 0    # the largest graph of one model call on windows, measured (bytes)
    arrays_bytes: int = 0    # the full-volume arrays (input, output, cotangent, gradient) of the last backward
    memmap: bool = False     # whether the engine's full-volume arrays were memory-mapped files

    def info(self, inferer) -> dict:
        return {"n_forward": self.n_forward, "n_backward": self.n_backward, "windows": sorted(self.windows),
                "n_windows": self.n_windows, "inferer": inferer_settings(inferer)}

    def memory(self) -> dict:
        return {"kept_window_rows": self.kept, "recomputed_window_rows": self.recomputed,
                "window_call_bytes": self.window_bytes, "volume_arrays_bytes": self.arrays_bytes,
                "memmap": self.memmap}


def inferer_settings(inferer) -> dict:
    """The settings of a ``SlidingWindowInferer`` that shape the output (for ``info``)."""
    mode = getattr(inferer.mode, "value", inferer.mode)
    return {"roi_size": inferer.roi_size, "sw_batch_size": inferer.sw_batch_size, "overlap": inferer.overlap,
            "mode": str(mode), "sigma_scale": inferer.sigma_scale,
            "padding_mode": str(getattr(inferer.padding_mode, "value", inferer.padding_mode)), "cval": inferer.cval,
            "windows": "nnU-Net" if hasattr(inferer, "window_layout") else "MONAI"}


class _WindowedVJP(torch.autograd.Function):
    """Forward: eq. (1) by MONAI's inferer, without a graph. Backward: eq. (2), window by window."""

    @staticmethod
    def forward(x, net):
        return net.blend(x, keep=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, net = inputs
        ctx.save_for_backward(x)
        ctx.net = net
        ctx.kept, net._kept = net._kept, None   # the window graphs live (and die) with this node

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        return ctx.net.input_vjp(x, grad, kept), None


def _nonzero(t: torch.Tensor) -> bool:
    """Whether a cotangent block is non-zero (a batched cotangent, ``is_grads_batched=True``, cannot be
    read: the window-by-window backward refuses it with a typed error)."""
    try:
        return bool(t.any())
    except RuntimeError as e:
        raise UnsupportedModelError("a sliding-window model cannot be backpropagated with batched cotangents "
                                    "(torch.autograd.grad(..., is_grads_batched=True) or torch.func.vmap); "
                                    "backpropagate one cotangent at a time") from e


def _graph_bytes(own: set):
    """A ``saved_tensors_hooks`` pack function counting the bytes autograd saves (each storage once, the
    model's own parameters and buffers excluded), and a function reading the count."""
    seen: dict = {}

    def pack(t):
        k, n = storage_key(t)
        if k not in own:
            seen.setdefault(k, n)
        return t
    return pack, lambda: sum(seen.values())


class _KeptGraphs:
    """The window graphs kept from one forward with gradients (module docstring, "Memory"): MONAI's inferer
    calls :meth:`predictor` with its windows in its order (row ``r`` of all its calls is window
    ``r % n_windows`` of sample ``r // n_windows``; every call's windows are checked against the input, and
    any mismatch drops what is kept); each call runs with a graph, which is kept while the kept graphs fit in
    ``room`` bytes, and from the first call that does not fit on the rest run without one (and are recomputed
    in the backward)."""

    def __init__(self, net: "SlidingWindowModel", x: torch.Tensor, geo: WindowGeometry):
        self.net, self.geo, self.x = net, geo, x
        self.xp = geo.pad_input(x) if geo.padded else x
        self.row, self.used, self.keeping = 0, 0, True
        self.graphs: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor, int]] = []
        self.own = {p.untyped_storage().data_ptr() for p in list(net.parameters()) + list(net.buffers())}

    def _matches(self, win: torch.Tensor, keys) -> bool:
        return all(torch.equal(win[i:i + 1].to(self.xp.device), self.xp[(slice(b, b + 1), slice(None), *self.geo.slices[w])])
                   for i, (b, w) in enumerate(keys))

    def predictor(self, win: torch.Tensor) -> torch.Tensor:
        nw, n = len(self.geo.slices), int(win.shape[0])
        keys = [(r // nw, r % nw) for r in range(self.row, self.row + n)]
        self.row += n
        if not self.keeping:
            return self.net.predict(win)
        if not self._matches(win, keys):   # an inferer that does not call in MONAI's order: keep nothing
            self.keeping, self.graphs, self.used = False, [], 0
            return self.net.predict(win)
        leaf = win.detach().requires_grad_(True)
        pack, nbytes = _graph_bytes(self.own)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.net.predict(leaf)
        size = nbytes() + out.numel() * out.element_size() + leaf.numel() * leaf.element_size()
        stats = self.net.stats
        stats.window_bytes = max(stats.window_bytes, size)
        arrays = _volume_arrays_bytes(self.x, out.shape[1], self.geo)
        # kept graphs + this one + the working space of one more window call (about this one) + the arrays
        if out.requires_grad and self.net.budget is not None and \
                arrays + self.net._live_kept() + 2 * size <= self.net.budget:
            self.graphs.append((keys, leaf, out, size))
            self.used += size
            stats.kept += n
        else:
            self.keeping = False   # the graph just built is dropped: from here on, recompute in the backward
        return out.detach()


_LIBC: list = []


def release_heap(device) -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim(0)``) on the CPU; a
    no-op elsewhere (another C library, a CUDA device).

    glibc serves allocations below its mmap threshold from the heap, and the threshold rises (up to 32 MB)
    each time a larger block is freed, so after the first full-volume temporary every window tensor lives
    on the heap; what one window's backward frees stays resident there, fragmented, beside the next
    window's graph. Trimming between window calls keeps the resident peak near the live tensors (the
    one-window budget of ``bench/results/sliding_window.md``); it costs a walk of the free lists, well
    under a window's compute."""
    if torch.device(device).type != "cpu":
        return
    if not _LIBC:
        try:
            import ctypes
            libc = ctypes.CDLL(None)
            _LIBC.append(libc.malloc_trim if hasattr(libc, "malloc_trim") else None)
        except (OSError, TypeError):   # no C library to open by name (Windows)
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def _volume_arrays_bytes(x: torch.Tensor, k: int, geo: WindowGeometry) -> int:
    """Bytes of the four full-volume arrays of a sliding-window gradient: input and gradient (``C``
    channels), output and cotangent (``k`` channels), on the padded grid, in ``x``'s dtype."""
    return int(x.shape[0] * math.prod(geo.image) * (2 * x.shape[1] + 2 * k) * x.element_size())


def _volume_array(shape, dtype: torch.dtype, device, memmap: bool) -> torch.Tensor:
    """A zero full-volume array: in memory, or (``memmap``, on the CPU, a dtype numpy has) backed by a
    memory-mapped file in a temporary folder; the file is unlinked at once (the mapping keeps its pages
    until the tensor is freed, and nothing is left on disk)."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}.get(dtype)
    if not memmap or np_dtype is None or torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    folder = tempfile.mkdtemp(prefix="medexplain-sw-")
    path = os.path.join(folder, "array.bin")
    try:
        arr = np.memmap(path, dtype=np_dtype, mode="w+", shape=tuple(int(s) for s in shape))   # zero-filled
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)
    return torch.from_numpy(arr)


class SlidingWindowModel(OutputAdapter):
    """``model`` run through a ``monai.inferers.SlidingWindowInferer``, with the exact window-by-window
    gradient (module docstring, eqs. 1-2).

    ``output`` selects the explained tensor of each window's output (:func:`medexplain.engine.core.select_output`,
    e.g. a deep-supervision head) before blending: the windows run ``with_output(model, output)``, so an
    adapter given as ``model`` (e.g. one that counts rows) keeps running per window. Being an
    :class:`~medexplain.engine.core.OutputAdapter`, layer names resolve on the user's model
    (:func:`medexplain.engine.core.unwrap`). ``stats`` counts the windows (:class:`WindowStats`). The model must
    return a dense output on each window's grid ``(n, K, *roi_size)``.
    """

    def __init__(self, model: nn.Module, inferer, output=None):
        if isinstance(model, SlidingWindowModel):
            raise UnsupportedModelError("the model already runs through a sliding-window inferer")
        super().__init__(with_output(model, output), None)
        m = _monai()
        if not isinstance(inferer, m["SlidingWindowInferer"]):
            raise UnsupportedModelError(f"inferer must be a monai.inferers.SlidingWindowInferer, got "
                                        f"{type(inferer).__name__}")
        if getattr(inferer, "with_coord", False):
            raise UnsupportedModelError("SlidingWindowInferer(with_coord=True) passes window coordinates to the network; "
                                        "explanations need a network of the window alone")
        if getattr(inferer, "buffer_steps", None):
            raise UnsupportedModelError("SlidingWindowInferer(buffer_steps=...) reorders the windows for GPU buffering; "
                                        "use buffer_steps=None for explanations")
        if int(inferer.sw_batch_size) < 1:
            raise InputError(f"sw_batch_size must be >= 1, got {inferer.sw_batch_size}")
        self.inferer = inferer
        self.stats = WindowStats()
        self._geo: dict = {}
        self._base = None
        #: The memory budget of one explanation, in bytes (:func:`medexplain.engine.options.plan_window_memory`);
        #: ``None``: keep no window graph (every window is recomputed in the backward, the smallest peak).
        self.budget: int | None = None
        self._kept = None
        self._keepers: weakref.WeakSet = weakref.WeakSet()

    def _live_kept(self) -> int:
        """Bytes of the window graphs kept by forwards whose backward has not run yet."""
        return sum(k.used for k in list(self._keepers))

    def reset(self) -> None:
        """Start counting windows afresh (one explanation's ``info``) and drop the cached window outputs."""
        self.stats = WindowStats()
        self._base = None

    # ---------------------------------------------------------------------------------------------
    def geometry(self, x: torch.Tensor) -> WindowGeometry:
        """The windows of ``x``'s grid (cached per shape, dtype and device)."""
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        if key in self._geo:
            return self._geo[key]
        m, inf = _monai(), self.inferer
        spatial, nd = tuple(int(s) for s in x.shape[2:]), x.ndim - 2
        if isinstance(inf.roi_size, Sequence) and len(inf.roi_size) != nd:
            raise InputError(f"roi_size {tuple(inf.roi_size)} has {len(inf.roi_size)} axes; the input has {nd} spatial "
                             f"axes {spatial}")
        roi = tuple(int(r) for r in m["fall_back_tuple"](inf.roi_size, spatial))
        overlap = m["ensure_tuple_rep"](inf.overlap, nd)
        if any(not 0 <= o < 1 for o in overlap):
            raise InputError(f"overlap must be in [0, 1), got {inf.overlap}")
        image = tuple(max(s, r) for s, r in zip(spatial, roi))
        pad: list[int] = []
        for k in range(nd - 1, -1, -1):  # F.pad order, last axis first (as sliding_window_inference pads)
            diff = max(roi[k] - spatial[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        device = inf.sw_device or x.device
        if hasattr(inf, "window_layout"):  # an inferer that places its own windows (nnU-Net's, models/nnunet.py)
            slices, imp = inf.window_layout(image, x.dtype, x.device)
        else:
            slices = m["dense_patch_slices"](image, roi, m["scan_interval"](image, roi, nd, overlap))
            valid = m["get_valid_patch_size"](image, roi)
            if valid == roi and inf.roi_weight_map is not None:
                imp = inf.roi_weight_map
            else:
                imp = m["compute_importance_map"](valid, mode=inf.mode, sigma_scale=inf.sigma_scale, device=device,
                                                  dtype=x.dtype)
        imp = torch.as_tensor(imp).to(dtype=x.dtype, device=x.device).reshape(1, 1, *roi)
        mode = str(getattr(inf.padding_mode, "value", inf.padding_mode))
        geo = WindowGeometry(spatial, roi, image, pad, [tuple(slice(*s.indices(n)) for s, n in zip(sl, image))
                                                         for sl in slices], imp, mode, float(inf.cval))
        self._geo[key] = geo
        self.stats.n_windows = len(geo.slices)
        return geo

    def predict(self, win: torch.Tensor) -> torch.Tensor:
        """The network on a batch of windows: the explained tensor ``(n, K, *roi)``, counted."""
        out = select_output(self.model(win), self.output, win.ndim)
        self.stats.n_forward += win.shape[0] * n_passes(self.model)
        if out.ndim != win.ndim or tuple(out.shape[2:]) != tuple(win.shape[2:]):
            raise UnsupportedModelError(
                f"sliding-window explanations need a dense output on each window's grid {tuple(win.shape[2:])}; the model "
                f"returned {tuple(out.shape)} for a window {tuple(win.shape)}")
        return out

    def blend(self, x: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Eq. (1), by MONAI's inferer itself (no graph for the blend). ``keep``: keep the window graphs that
        fit the budget for the backward (:class:`_KeptGraphs`, left in ``self._kept``)."""
        geo = self.geometry(x)  # typed errors before MONAI's own
        kept = _KeptGraphs(self, x, geo) if keep and self.budget is not None else None
        if kept is not None:
            self._keepers.add(kept)
        with torch.no_grad():
            out = self.inferer(x, self.predict if kept is None else kept.predictor)
        self._kept = kept
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(x, "as_tensor"):  # a MONAI MetaTensor: explain the plain tensor
            x = x.as_tensor()
        if torch.is_grad_enabled() and x.requires_grad:
            return _WindowedVJP.apply(x, self)
        return self.blend(x)

    # ---------------------------------------------------------------------------------------------
    def _window_rows(self, xp: torch.Tensor, items) -> torch.Tensor:
        """Window ``sl`` of padded row ``r`` for each ``(r, sl)``, stacked."""
        device = self.inferer.sw_device or xp.device
        return torch.cat([xp[(slice(r, r + 1), slice(None), *sl)] for r, sl in items]).to(device)

    @staticmethod
    def window_cotangent(gp: torch.Tensor, geo: WindowGeometry, items) -> torch.Tensor:
        """``g * (P_w^T ds/dO) / (P_w^T c)`` of eq. (2) for each ``(b, w)`` (sample, window), stacked."""
        return torch.cat([gp[(slice(b, b + 1), slice(None), *geo.slices[w])] * geo.importance / geo.count_in(w)
                          for b, w in items])

    def input_vjp(self, x: torch.Tensor, grad: torch.Tensor, kept: _KeptGraphs | None = None) -> torch.Tensor:
        """Eq. (2): the input gradient for the output cotangent ``grad`` ``(B, K, *spatial)``, one window
        VJP per window with a non-zero cotangent: through the graphs ``kept`` from the forward where there
        are some, the other windows recomputed ``sw_batch_size`` per network call. The gradient (and the
        padded copies, if any) are memory-mapped files when the budget cannot hold the four full-volume
        arrays beside one window call (:func:`_volume_array`)."""
        geo = self.geometry(x)
        arrays = _volume_arrays_bytes(x, grad.shape[1], geo)
        self.stats.arrays_bytes = arrays
        memmap = self.budget is not None and arrays + self.stats.window_bytes + self._live_kept() > self.budget
        self.stats.memmap = self.stats.memmap or (memmap and x.device.type == "cpu")
        with torch.enable_grad():
            xd = x.detach().requires_grad_(geo.padded)
            xp = geo.pad_input(xd)
        if geo.padded:
            gp = _volume_array((grad.shape[0], grad.shape[1], *geo.image), grad.dtype, grad.device, memmap)
            gp[(slice(None), slice(None), *geo.crop)] = grad
        else:
            gp = grad
        dxp = _volume_array(xp.shape, x.dtype, x.device, memmap)
        jobs = [(b, w) for b in range(x.shape[0]) for w, sl in enumerate(geo.slices)
                if _nonzero(gp[(slice(b, b + 1), slice(None), *sl)])]
        if kept is not None and kept.graphs:   # windows whose graph was kept: no recompute
            todo = set(jobs)
            graphs, kept.graphs = kept.graphs, []
            while graphs:   # each graph is freed once used
                keys, leaf, out, size = graphs.pop(0)
                hit = [k in todo for k in keys]
                # a kept call backpropagates all its windows (a backward costs about two forwards): when few
                # of them have a cotangent, recomputing those few costs less, and the cost follows the target
                if any(hit) and 3 * sum(hit) >= 2 * len(keys):
                    cot = self.window_cotangent(gp, geo, keys)
                    (gx,) = torch.autograd.grad(out, leaf, cot.to(dtype=out.dtype, device=out.device))
                    gx = gx.to(device=x.device, dtype=x.dtype)
                    for i, (b, w) in enumerate(keys):
                        if hit[i]:
                            dxp[(slice(b, b + 1), slice(None), *geo.slices[w])] += gx[i:i + 1]
                    self.stats.n_backward += len(keys) * n_passes(self.model)
                    self.stats.windows.update(w for (_, w), h in zip(keys, hit) if h)
                    todo.difference_update(keys)
                kept.used -= size
                del keys, leaf, out
            kept.used = 0
            jobs = [j for j in jobs if j in todo]
        for part in chunks(len(jobs), int(self.inferer.sw_batch_size)):
            release_heap(x.device)   # the previous window's activations, freed, leave the process
            items = [(b, geo.slices[w]) for b, w in jobs[part]]
            xin = self._window_rows(xp.detach(), items).requires_grad_(True)
            cot = self.window_cotangent(gp, geo, jobs[part])
            self.stats.recomputed += len(items)
            with torch.enable_grad():
                out = self.predict(xin)
                if not out.requires_grad:
                    raise UnsupportedModelError("the model output does not depend differentiably on the input; "
                                                "gradient methods cannot run (try occlusion)")
                (gx,) = torch.autograd.grad(out, xin, cot.to(dtype=out.dtype, device=out.device))
            gx = gx.to(device=x.device, dtype=x.dtype)
            for i, (b, sl) in enumerate(items):
                dxp[(slice(b, b + 1), slice(None), *sl)] += gx[i:i + 1]
            self.stats.n_backward += len(items) * n_passes(self.model)
            self.stats.windows.update(w for _, w in jobs[part])
        if not geo.padded:
            return dxp
        (dx,) = torch.autograd.grad(xp, xd, dxp)
        return dx

    # ---------------------------------------------------------------------------------------------
    def _base_windows(self, x: torch.Tensor, xp: torch.Tensor, needed) -> dict:
        """``f(x_w)`` of the unchanged image per ``(sample, window)``, computed once per explanation."""
        if self._base is None or self._base[0] is not x or self._base[1] != x._version:
            self._base = (x, x._version, {})
        cache = self._base[2]
        geo = self.geometry(x)
        todo = sorted(set(needed) - set(cache))
        for part in chunks(len(todo), int(self.inferer.sw_batch_size)):
            keys = todo[part]
            out = self.predict(self._window_rows(xp, [(b, geo.slices[w]) for b, w in keys]))
            for i, k in enumerate(keys):
                cache[k] = out[i:i + 1].to(device=x.device, dtype=x.dtype)
        return cache

    @torch.no_grad()
    def forward_changed(self, x: torch.Tensor, base_out: torch.Tensor, rows_x: torch.Tensor, rows: torch.Tensor,
                        boxes) -> torch.Tensor:
        """Eq. (1) for inputs ``rows_x`` that equal ``x[rows]`` outside ``boxes`` (one tuple of slices per
        row): ``O' = O + sum_{w touched} P_w(g * (f(x'_w) - f(x_w))) / c``, so only the windows a box
        touches are run (the unchanged image's window outputs are computed once and cached)."""
        geo = self.geometry(x)
        xp, rp = geo.pad_input(x), geo.pad_input(rows_x)
        jobs = [(r, w) for r in range(rows_x.shape[0]) for w in geo.touching(boxes[r])]
        base = self._base_windows(x, xp, [(int(rows[r]), w) for r, w in jobs])
        out = base_out[rows.to(base_out.device)].clone()
        delta = None
        for part in chunks(len(jobs), int(self.inferer.sw_batch_size)):
            items = jobs[part]
            new = self.predict(self._window_rows(rp, [(r, geo.slices[w]) for r, w in items])).to(x.device, x.dtype)
            if delta is None:
                delta = torch.zeros((rows_x.shape[0], new.shape[1], *geo.image), dtype=x.dtype, device=x.device)
            for i, (r, w) in enumerate(items):
                delta[(slice(r, r + 1), slice(None), *geo.slices[w])] += \
                    geo.importance * (new[i:i + 1] - base[(int(rows[r]), w)])
        if delta is not None:
            out += (delta / geo.count)[(slice(None), slice(None), *geo.crop)].to(out.dtype)
        return out


def is_sliding(model) -> bool:
    """Whether ``model`` runs through a sliding-window inferer (:class:`SlidingWindowModel`)."""
    return isinstance(model, SlidingWindowModel)


def with_inferer(model, inferer=None, output=None):
    """The one wrapping rule for ``inferer=`` and ``output=``: ``model`` run through ``inferer`` (a
    :class:`SlidingWindowModel`, ``output`` applied per window), or :func:`medexplain.engine.core.with_output`
    when ``inferer`` is None. A model that already is a :class:`SlidingWindowModel` keeps its inferer
    unless a new one is given."""
    if isinstance(model, SlidingWindowModel):
        if inferer is None and output is None:
            return model
        return SlidingWindowModel(model.model, inferer or model.inferer, output)
    if inferer is None:
        return with_output(model, output)
    return SlidingWindowModel(model, inferer, output)


def window_info(model, info: dict | None = None) -> dict:
    """``info`` with the window counts of a :class:`SlidingWindowModel` (unchanged for any other model):
    ``n_forward`` / ``n_backward`` become window rows, ``windows`` the backpropagated windows and
    ``n_windows`` the windows per image; all of them also under ``sliding_window`` (with the inferer's
    settings), so a method's own ``windows`` entry (occlusion's occluder count) is kept."""
    info = dict(info or {})
    if not isinstance(model, SlidingWindowModel):
        return info
    sw = model.stats.info(model.inferer)
    info.update({k: v for k, v in sw.items() if k != "inferer" and (k not in info or k.startswith("n_"))})
    info["sliding_window"] = sw
    return info


def forward_changed(model, x: torch.Tensor, base_out: torch.Tensor, rows_x: torch.Tensor, rows: torch.Tensor,
                    boxes, cost: Cost | None = None) -> torch.Tensor:
    """The model's output for ``rows_x``, rows of ``x`` (``x[rows]``) changed only inside ``boxes`` (one
    tuple of slices per row), given ``base_out`` = the output for ``x``. Through a sliding-window model only
    the windows a box touches are re-run (:meth:`SlidingWindowModel.forward_changed`); any other model
    runs every row (:func:`medexplain.engine.core.forward`)."""
    if not isinstance(model, SlidingWindowModel):
        return forward(model, rows_x, cost)
    out = model.forward_changed(x, base_out, rows_x, rows, boxes)
    if cost is not None:
        cost.n_forward += rows_x.shape[0]
    return out
