"""Where a CAM looks and where its cells lie: the layer view, the default layer, and receptive-field
aligned upsampling. This is everything every CAM shares except its channel weighting (the family is in
:mod:`medexplain.methods.cam`); ``docs/cam.md`` describes the rules with examples.

**Layer views.** A CAM needs a feature map ``A`` of shape ``(B, K, *grid)`` with as many grid axes as
the input has spatial axes. :class:`LayerView` turns a layer's own output into that: channels-first maps
as they are; channels-last maps ``(B, *grid, K)`` (MONAI's Swin stages) moved to channels-first;
token sequences ``(B, N[+1], K)`` (MONAI ``ViT``, ``UNETR``) reshaped to the patch grid, a leading class
token dropped; or a user ``reshape=`` callable (as pytorch-grad-cam's ``reshape_transform``). The view
is an index permutation, so activations and their gradients go through it alike, and
:meth:`LayerView.index_map` says which entry of the layer's own output each grid entry is (used to
ablate channels in the layer's own layout).

**The default layer** (:func:`default_layer`) is found from one probe forward in which every module's
output is recorded on the autograd path (``core.capture_layers(mode="tap")``): the last module, in call
order, (a) called once, (b) whose output is a feature map on a grid that tiles the input (an integer
stride per axis), with at least two cells, (c) that is not a ``Linear`` projection, (d) whose grid cells
the explained output depends on (a nonzero gradient of a fixed random weighting of the output with
respect to the grid part, so a ViT's last token layer, read only through its class token, is skipped,
and so are deep-supervision heads unused in eval), (e) for dense outputs (segmenters), recorded before
the last convolution the output depends on (the output head), and (f) not a pointwise module (a norm,
activation, dropout or identity) unless every candidate is one. For a classifier this is the last
spatial feature map before global pooling; for an encoder-decoder the last decoder feature map before
the output head.

**Receptive-field aligned upsampling.** A CAM is computed on the layer's cell grid and has to be brought
to the input grid. Bilinear upsampling with ``align_corners=False`` (MONAI, pytorch-grad-cam's
``cv2.resize``, Captum's ``interpolate``) assumes that cell ``i`` of an axis downsampled ``s`` times is
centred at input position ``s i + (s - 1) / 2``. A convolution or pooling of kernel ``k``, stride ``s``,
padding ``p`` and dilation ``d`` centres output cell ``j`` on its input cell ``s j - p + d (k - 1) / 2``;
composing, a layer's cell ``i`` is centred at ``offset + step * i`` input pixels, affine per axis. For
the usual stride-2, padding-1, 3x3 convolution ``s j - 1 + 1 = 2 j``, so after three of them (an 8x8
map on a 64x64 input, as a ResNet's ``layer4``) cell ``i`` is centred at ``8 i`` (cell 4 at pixel 32),
while bilinear upsampling puts it at ``8 i + 3.5`` (35.5): every peak lands 3.5 px down and right of the
evidence. A 1x1 stride-2 shortcut (``2 j``), a 2x2 stride-2 transposed convolution (input cell
``(j - 0.5) / 2``), ``F.interpolate`` and padding compose the same way.

:func:`cell_geometry` computes ``offset`` and ``step`` exactly from the autograd graph of the probe
forward: it walks from the layer's output to the input through every convolution (transposed or not),
pooling, adaptive pooling, upsampling, padding and strided slice node, using the strides, paddings,
dilations and kernel sizes saved on them, and through every node that keeps the spatial shape
(elementwise ops, norms, concatenation along channels) unchanged; where branches meet (a residual
shortcut, a U-Net skip) their centres are averaged (they agree in most designs; DynUNet's 2x2 transposed
convolutions put its upsampled branch 1 px off the skip at full resolution, so its last decoder cells
sit 0.5 px between them). A branch through an op whose geometry is not known (token reshapes, window
attention: UNETR's transformer path into its decoder) is left out where a known branch meets it; where
no known branch remains, and for channels-last and token layers, the cells are taken to tile the input
evenly, which is exact for non-overlapping patch embeddings and patch merging, and is the bilinear
placement. :func:`upsample_cells` then resamples the cell grid at those positions, one axis at a time,
by linear interpolation (clamped at the outermost cell centres, as ``F.interpolate``), N-D.
``upsample="bilinear"`` is ``F.interpolate(..., align_corners=False)`` itself. Geometry and the default
layer are cached per (model, layer, input size), as :func:`layer_plan`.

Written by hand: no maintained library computes receptive-field centres from a model's graph or
resamples CAMs with them (pytorch-grad-cam, MONAI, Captum and TorchCAM all resize with
``align_corners=False`` or ``True``).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from medexplain.engine.core import (
    ACTIVATION,
    CONV,
    CONV_TRANSPOSE,
    NORM,
    Cost,
    capture_layers,
    find_layer,
    forward,
    model_guard,
    network_cache,
    resize_to,
    unwrap,
)
from medexplain.errors import InputError, RepeatedLayerCallError, UnsupportedModelError

LAYOUTS = ("auto", "channels_first", "channels_last", "tokens")
UPSAMPLE = ("aligned", "bilinear", "align_corners")
POINTWISE = NORM + ACTIVATION + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_UNKNOWN = "unknown"


# ---------------------------------------------------------------------------------------------- layer views
@dataclass(frozen=True)
class LayerView:
    """How a layer's own output ``(B, *row_shape)`` becomes a CAM feature map ``(B, K, *grid)``.

    ``kind``: ``channels_first``, ``channels_last``, ``tokens`` (``drop`` leading tokens, e.g. a class
    token, are dropped) or ``reshape`` (the user's callable)."""

    kind: str
    row_shape: tuple
    grid: tuple
    channels: int
    drop: int = 0
    reshape: Callable | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "channels_first":
            return t
        if self.kind == "channels_last":
            return t.movedim(-1, 1)
        if self.kind == "tokens":
            return t[:, self.drop:].transpose(1, 2).reshape(t.shape[0], self.channels, *self.grid)
        return self.reshape(t)

    def index_map(self) -> torch.Tensor:
        """``(K, *grid)`` long: the flat index, within one row of the layer's own output, of each grid entry."""
        n = math.prod(self.row_shape)
        idx = self(torch.arange(n, dtype=torch.long).view(1, *self.row_shape))[0]
        if idx.dtype != torch.long or idx.numel() != idx.unique().numel():
            raise UnsupportedModelError("the reshape= callable must only rearrange entries (permute, reshape, "
                                        "slice), so that channels can be located in the layer's own output")
        return idx


def _grid_fits(grid, spatial) -> bool:
    """An integer stride ``f >= 1`` with ``grid_d`` = floor or ceil of ``spatial_d / f`` on every axis (per
    axis the strides that fit are the open interval ``(s / (g + 1), s / (g - 1))``)."""
    if len(grid) != len(spatial) or any(g < 1 for g in grid):
        return False
    lo = max(s / (g + 1) for g, s in zip(grid, spatial))
    hi = min(s / (g - 1) if g > 1 else math.inf for g, s in zip(grid, spatial))
    return max(1, math.floor(lo) + 1) < hi


def _token_grid(n: int, spatial) -> tuple[tuple, int] | None:
    """The patch grid of ``n`` tokens on an input of ``spatial`` (patch size ``p``: ``ceil(s_d / p)`` per
    axis), and the number of leading tokens to drop (0, or 1 for a class token)."""
    for drop in (0, 1):
        for p in range(1, max(spatial) + 1):
            grid = tuple(-(-s // p) for s in spatial)
            if math.prod(grid) == n - drop:
                return grid, drop
    return None


def _module_channels(module) -> int | None:
    """The channel count a module says it produces (conv / linear / norm attributes, Swin's ``dim``)."""
    for attr in ("out_channels", "out_features", "num_features", "num_channels", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def layer_view(a: torch.Tensor, spatial, module=None, layout: str = "auto", reshape=None, name: str = "layer",
               strict: bool = False) -> LayerView:
    """The :class:`LayerView` of a layer whose output (one forward) is ``a``, on an input of ``spatial``.

    ``layout="auto"`` reads a 3-D output ``(B, N, K)`` as tokens and decides channels-first vs last from
    the channel count the module declares, then from which reading gives a grid that tiles the input.
    ``strict=True`` (the default-layer search) also requires the grid to tile the input."""
    nd = len(spatial)
    row = tuple(a.shape[1:])
    what = (f"layer {name!r} output has shape {tuple(a.shape)}; a CAM needs a spatial feature map (B, K, *spatial) "
            f"with {nd} spatial dims, channels-last (B, *spatial, K) or tokens (B, N, K)")
    if reshape is not None:
        t = reshape(a)
        if not isinstance(t, torch.Tensor) or t.ndim != nd + 2 or t.shape[0] != a.shape[0]:
            raise UnsupportedModelError(f"reshape= turned {name!r}'s output {tuple(a.shape)} into "
                                        f"{tuple(getattr(t, 'shape', ()))}; it must give (B, K, *grid) with {nd} grid axes")
        return LayerView("reshape", row, tuple(t.shape[2:]), t.shape[1], reshape=reshape)
    if layout == "tokens" or (layout == "auto" and a.ndim == 3):
        if a.ndim != 3:
            raise UnsupportedModelError(what)
        found = _token_grid(a.shape[1], spatial)
        if found is None:
            raise UnsupportedModelError(f"layer {name!r} gives {a.shape[1]} tokens, which no patch grid of the "
                                        f"{tuple(spatial)} input has (with or without a class token); pass "
                                        "reshape=, a callable (B, N, K) -> (B, K, *grid)")
        grid, drop = found
        return LayerView("tokens", row, grid, a.shape[2], drop=drop)
    if a.ndim != nd + 2:
        raise UnsupportedModelError(what)
    first, last = tuple(a.shape[2:]), tuple(a.shape[1:-1])
    if layout == "channels_first":
        kind = "channels_first"
    elif layout == "channels_last":
        kind = "channels_last"
    else:
        k = _module_channels(module) if module is not None else None
        if k is not None and a.shape[-1] == k and a.shape[1] != k:
            kind = "channels_last"
        elif k is not None and a.shape[1] == k and a.shape[-1] != k:
            kind = "channels_first"
        elif _grid_fits(last, spatial) and not _grid_fits(first, spatial):
            kind = "channels_last"
        else:
            kind = "channels_first"
    grid = first if kind == "channels_first" else last
    if strict and not _grid_fits(grid, spatial):
        raise UnsupportedModelError(what)
    return LayerView(kind, row, grid, a.shape[1] if kind == "channels_first" else a.shape[-1])


# ---------------------------------------------------------------------------------------- cell geometry
def _axes(node, nd: int, out_ndim: int):
    return [out_ndim - nd + ax for ax in range(nd)]


def _per_axis(v, nd: int, default: int) -> list:
    v = list(v) if v is not None else []
    return [default] * nd if not v else v * nd if len(v) == 1 else v


def _conv_like(g, nd, kernel, stride, padding, dilation, transposed=False):
    kernel = _per_axis(kernel, nd, 1)
    stride, padding, dilation = _per_axis(stride, nd, 0), _per_axis(padding, nd, 0), _per_axis(dilation, nd, 1)
    stride = kernel if not any(stride) else stride      # (pooling saves an empty stride for "= kernel")
    if not len(kernel) == len(stride) == len(padding) == len(dilation) == nd:
        return _UNKNOWN
    out = []
    for (o, t), k, s, p, d in zip(g, kernel, stride, padding, dilation):
        if transposed:   # output j receives input i at j = s i - p + d kk: centre (j + p - d (k - 1) / 2) / s
            out.append((o + t * (p - d * (k - 1) / 2) / s, t / s))
        else:            # output j reads input s j - p + d kk: centre s j - p + d (k - 1) / 2
            out.append((o + t * (d * (k - 1) / 2 - p), t * s))
    return tuple(out)


def _resample(g, in_sizes, out_sizes, align_corners):
    out = []
    for (o, t), n_in, n_out in zip(g, in_sizes, out_sizes):
        if align_corners:
            r = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            out.append((o, t * r))
        else:            # output j sits at input (j + 0.5) n_in / n_out - 0.5
            r = n_in / n_out
            out.append((o + t * (0.5 * r - 0.5), t * r))
    return tuple(out)


def _mean(geoms):
    nd = len(geoms[0])
    return tuple((sum(g[a][0] for g in geoms) / len(geoms), sum(g[a][1] for g in geoms) / len(geoms)) for a in range(nd))


def _node_geometry(node, inputs, x_leaf, nd, unknown_ops):
    """Geometry ``((offset, step),) * nd`` of a node's output, ``None`` (independent of the input) or
    ``_UNKNOWN``; ``inputs`` are ``(geometry, shape)`` of the node's inputs."""
    name = type(node).__name__
    if name == "AccumulateGrad":
        return tuple((0.0, 1.0) for _ in range(nd)) if node.variable is x_leaf else None
    deps = [(g, s) for g, s in inputs if g is not None]
    if not deps:
        return None
    try:
        out_shape = tuple(node._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError):
        unknown_ops.add(name)
        return _UNKNOWN
    known = [(g, s) for g, s in deps if g is not _UNKNOWN]
    if name.startswith("Convolution"):
        g = inputs[0][0]
        if g is None or g is _UNKNOWN or len(deps) > 1:   # (an input-dependent weight has no fixed geometry)
            return _UNKNOWN
        k = tuple(node._saved_weight.shape[2:])
        return _conv_like(g, nd, k, node._saved_stride, node._saved_padding, node._saved_dilation,
                          bool(node._saved_transposed))
    if "Pool" in name and not name.startswith("Adaptive"):
        g = inputs[0][0]
        if g is None or g is _UNKNOWN:
            return g
        return _conv_like(g, nd, node._saved_kernel_size, node._saved_stride, node._saved_padding,
                          getattr(node, "_saved_dilation", ()))
    if name.startswith("Adaptive") or name.startswith("Upsample"):
        g, in_shape = inputs[0]
        if g is None or g is _UNKNOWN:
            return g
        align = bool(getattr(node, "_saved_align_corners", False)) if name.startswith("Upsample") else False
        return _resample(g, in_shape[-nd:], out_shape[-nd:], align)
    if name.endswith("PadNdBackward0") or "Pad" in name:
        g, in_shape = inputs[0]
        if g is None or g is _UNKNOWN:
            return g
        pad = list(getattr(node, "_saved_pad", getattr(node, "_saved_padding", ())))
        out = []
        for ax, (o, t) in zip(_axes(node, nd, len(out_shape)), g):
            pos = 2 * (len(out_shape) - 1 - ax)
            out.append((o - t * (pad[pos] if pos < len(pad) else 0), t))
        return tuple(out)
    if name == "SliceBackward0":
        g, in_shape = inputs[0]
        if g is None or g is _UNKNOWN:
            return g
        dim = node._saved_dim % len(in_shape)
        axes = _axes(node, nd, len(in_shape))
        if dim in axes:
            start = node._saved_start if node._saved_start is not None else 0
            start = start + in_shape[dim] if start < 0 else start
            g = list(g)
            o, t = g[axes.index(dim)]
            g[axes.index(dim)] = (o + t * start, t * node._saved_step)
            return tuple(g)
    if name == "CatBackward0" and (node._saved_dim % len(out_shape)) in _axes(node, nd, len(out_shape)):
        unknown_ops.add(name + " (along a spatial axis)")
        return _UNKNOWN
    spatial = out_shape[-nd:] if len(out_shape) >= nd + 2 else None
    carry = [g for g, s in known if spatial is not None and tuple(s[-nd:]) == spatial and len(s) >= nd + 2]
    flat = [g for g, s in known if len(s) >= nd and all(v == 1 for v in s[-nd:])]   # a global (pooled) input
    if spatial is not None and carry and len(carry) + len(flat) == len(known):
        return _mean(carry)
    if known and len(flat) == len(known):
        return None   # depends on the input only through global statistics: no position
    if not known:
        return _UNKNOWN
    unknown_ops.add(name)
    return _UNKNOWN


def cell_geometry(t: torch.Tensor, x_leaf: torch.Tensor, nd: int) -> tuple[tuple | None, str]:
    """``(((offset, step),) * nd, note)``: cell ``i`` of the channels-first tensor ``t`` along spatial axis
    ``a`` is centred at input position ``offset_a + step_a * i`` (pixel centres at integer positions),
    from the autograd graph between ``x_leaf`` and ``t`` (see the module docstring). ``None`` with the
    reason in ``note`` when the graph holds an op of unknown geometry."""
    root = t.grad_fn
    if root is None:
        return None, "the layer does not depend on the input through autograd"
    memo: dict[int, object] = {}
    keep = []
    unknown_ops: set[str] = set()
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        nexts = [f for f, _ in getattr(node, "next_functions", ())]
        if not ready:
            stack.append((node, True))
            stack.extend((f, False) for f in nexts if f is not None and id(f) not in memo)
            continue
        inputs = []
        for f, idx in getattr(node, "next_functions", ()):
            if f is None:
                inputs.append((None, ()))
                continue
            try:
                shape = tuple(f._input_metadata[idx].shape) if type(f).__name__ != "AccumulateGrad" else tuple(f.variable.shape)
            except (AttributeError, IndexError, RuntimeError):
                shape = ()
            inputs.append((memo[id(f)], shape))
        memo[id(node)] = _node_geometry(node, inputs, x_leaf, nd, unknown_ops)
        keep.append(node)
    g = memo[id(root)]
    if g is None:
        return None, "the layer does not depend on the input through autograd"
    if g is _UNKNOWN:
        return None, f"the path holds ops of unknown geometry ({', '.join(sorted(unknown_ops)) or 'unknown'})"
    return g, "exact (strides, paddings and kernels on the path)"


def uniform_geometry(grid, spatial) -> tuple:
    """Cells tiling the input evenly: step ``s / g``, offset ``(step - 1) / 2`` (the bilinear placement)."""
    return tuple(((s / g - 1) / 2, s / g) for g, s in zip(grid, spatial))


def interpolation_matrix(n_out: int, n_cells: int, offset: float, step: float, dtype, device) -> torch.Tensor:
    """``(n_out, n_cells)`` linear-interpolation weights of output pixel ``j`` from cells centred at
    ``offset + step * i``, clamped to the outermost centres (``F.interpolate``'s border rule)."""
    j = torch.arange(n_out, dtype=torch.float64, device=device)
    u = ((j - offset) / step).clamp(0, n_cells - 1)
    i0 = u.floor().long().clamp(max=n_cells - 1)
    i1 = (i0 + 1).clamp(max=n_cells - 1)
    w1 = u - i0
    m = torch.zeros(n_out, n_cells, dtype=torch.float64, device=device)
    m.scatter_add_(1, i0[:, None], (1 - w1)[:, None])
    m.scatter_add_(1, i1[:, None], w1[:, None])
    return m.to(dtype)


def upsample_cells(cells: torch.Tensor, spatial, centres=None, mode: str = "aligned") -> torch.Tensor:
    """Bring ``(B, K, *grid)`` to ``(B, K, *spatial)``: ``mode="aligned"`` interpolates linearly between the
    cell centres ``centres`` (``((offset, step),) * nd``); ``"bilinear"`` is ``F.interpolate`` with
    ``align_corners=False`` (MONAI, pytorch-grad-cam); ``"align_corners"`` with ``align_corners=True``
    (``torch.nn.UpsamplingBilinear2d``, pytorch-grad-cam's Score-CAM masks)."""
    spatial = tuple(int(s) for s in spatial)
    if mode == "bilinear":
        return resize_to(cells, spatial)
    if mode == "align_corners":
        if tuple(cells.shape[2:]) == spatial:
            return cells
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
        return torch.nn.functional.interpolate(cells, size=spatial, mode=interp, align_corners=True)
    out = cells
    for ax, (n_out, (o, t)) in enumerate(zip(spatial, centres)):
        n = out.shape[2 + ax]
        if n == n_out and o == 0 and t == 1:
            continue
        m = interpolation_matrix(n_out, n, o, t, out.dtype, out.device)
        out = torch.movedim(torch.tensordot(out, m, dims=([2 + ax], [1])), -1, 2 + ax)
    return out


# -------------------------------------------------------------------------------- the plan of one layer
@dataclass
class LayerPlan:
    """What a CAM needs to know of its layer: its name, the :class:`LayerView`, where its cells lie
    (``centres``, ``((offset, step),) * nd``, and how they were found: ``geometry``)."""

    name: str
    view: LayerView
    centres: tuple
    geometry: str
    chosen: str = "given"

    def info(self) -> dict:
        return {"layer": self.name, "layout": self.view.kind, "cell_centres": [list(c) for c in self.centres],
                "geometry": self.geometry, "layer_choice": self.chosen}


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def output_weights(out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed random weighting of an output tensor (one draw per element from ``seed``), so that the
    dependency of ``(out * w).sum()`` on a layer is not hidden by cancellations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=out.dtype, device=out.device)


def dependent(out: torch.Tensor, tensors, views=None) -> list[bool]:
    """For each recorded tensor (on the autograd path, ``capture_layers(mode="tap")``), whether ``out``
    depends on it (on its grid part, when ``views`` gives a :class:`LayerView` per tensor)."""
    tensors = list(tensors)
    if not out.requires_grad or not tensors:
        return [False] * len(tensors)
    want = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not want:
        return [False] * len(tensors)
    grads = torch.autograd.grad((out * output_weights(out)).sum(), [tensors[i] for i in want], allow_unused=True,
                                retain_graph=True)  # (the saved kernels stay readable for cell_geometry)
    res = [False] * len(tensors)
    for i, g in zip(want, grads):
        if g is not None:
            v = views[i] if views is not None else None
            res[i] = bool((v(g) if v is not None else g).abs().amax() > 0)
    return res


def _probe_input(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p = torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float64)
    return p.to(dtype=x.dtype, device=x.device).requires_grad_(True)


def _structure(model) -> int:
    return hash(tuple(id(m) for m in unwrap(model).modules()))


def layer_plan(model, x: torch.Tensor, layer=None, layout: str = "auto", reshape=None, cost=None) -> LayerPlan:
    """The :class:`LayerPlan` of ``layer`` (``None``: :func:`default_layer`) for inputs shaped like ``x``:
    one probe forward of a seeded noise image, cached per (model, layer, input size, dtype, layout, reshape,
    output adapter). The probe is not counted in ``cost`` (cached or not), so a record's ``n_forward`` is the
    method's own rows and does not depend on what ran before in the process (a run's worker processes or
    actors take the cases in any order)."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layer is None and (layout != "auto" or reshape is not None):
        raise InputError("layout= and reshape= describe a named layer: pass layer= with them")
    user = unwrap(model)
    module = find_layer(model, layer) if layer is not None else None
    key = (_structure(model), getattr(model, "output", None) if model is not user else None, tuple(x.shape[1:]),
           x.dtype, str(x.device), module, layout, reshape)
    per_model = network_cache(_CACHE, user)
    if key not in per_model:
        probe_cost = Cost()
        with model_guard(user):   # eval mode, frozen weights: the probe changes nothing (also when called directly)
            plan = (_default_plan(model, x, probe_cost) if layer is None
                    else _named_plan(model, x, layer, module, layout, reshape, probe_cost))
        per_model[key] = plan
    return per_model[key]


def _named(model, module) -> str:
    return next((n for n, m in unwrap(model).named_modules() if m is module), type(module).__name__)


def _geometry_for(view: LayerView, t: torch.Tensor, probe: torch.Tensor, spatial) -> tuple[tuple, str]:
    if view.kind != "channels_first":
        return uniform_geometry(view.grid, spatial), (f"uniform: {view.kind.replace('_', '-')} cells are taken to tile "
                                                      "the input evenly (exact for non-overlapping patches)")
    g, note = cell_geometry(t, probe, len(spatial))
    if g is None:
        return uniform_geometry(view.grid, spatial), f"uniform: {note}"
    return g, note


def _named_plan(model, x, layer, module, layout, reshape, cost) -> LayerPlan:
    name = layer if isinstance(layer, str) else _named(model, module)
    spatial = tuple(x.shape[2:])
    probe = _probe_input(x)
    with torch.enable_grad(), capture_layers(model, [module], mode="tap") as caps:
        forward(model, probe, cost)
    cap = next(iter(caps.values()))
    if not cap.outputs:
        raise UnsupportedModelError(f"layer {name!r} was not called in the forward pass")
    view = layer_view(cap.outputs[0], spatial, module, layout, reshape, name)
    geoms = [_geometry_for(view, t, probe, spatial) for t in cap.outputs]
    if any(g != geoms[0][0] for g, _ in geoms):
        raise UnsupportedModelError(f"layer {name!r} was called {cap.calls} times in one forward, on cells at different "
                                    "positions of the input; a CAM cannot combine those calls: choose a layer that runs once")
    return LayerPlan(name, view, geoms[0][0], geoms[0][1], "given")


def default_layer(model, x: torch.Tensor) -> str:
    """The default CAM layer's name for inputs shaped like ``x`` (see the module docstring for the rule)."""
    return layer_plan(model, x).name


def _default_plan(model, x, cost) -> LayerPlan:
    spatial = tuple(x.shape[2:])
    named = [(n, m) for n, m in unwrap(model).named_modules() if n]
    probe = _probe_input(x)
    with torch.enable_grad(), capture_layers(model, [m for _, m in named], mode="tap", strict=False) as caps:
        out = forward(model, probe, cost)
    if cost is not None:
        cost.n_backward += 1
    recs = []       # (order, name, module, output, view or None)
    for (n, m), cap in zip(named, caps.values()):
        if cap.calls != 1:
            continue
        try:
            v = layer_view(cap.outputs[0], spatial, m, name=n, strict=True)
        except UnsupportedModelError:
            v = None
        recs.append((cap.order[0], n, m, cap.outputs[0], v))
    deps = dependent(out, [r[3] for r in recs], [r[4] for r in recs])
    dense = out.ndim > 2
    head = None
    if dense:
        convs = [r[0] for r, d in zip(recs, deps) if d and isinstance(r[2], CONV + CONV_TRANSPOSE)]
        head = max(convs) if convs else None
    cands = [r for r, d in zip(recs, deps) if d and r[4] is not None and math.prod(r[4].grid) > 1
             and not isinstance(r[2], nn.Linear) and (head is None or r[0] < head)]
    if not cands:
        repeated = [(n, cap.calls) for (n, m), cap in zip(named, caps.values()) if cap.calls > 1
                    and not isinstance(m, POINTWISE) and len({tuple(o.shape) for o in cap.outputs}) == 1]
        if repeated:
            raise RepeatedLayerCallError(
                f"no layer of the model runs once per forward: {', '.join(f'{n!r} ({c} calls)' for n, c in repeated[-3:])} "
                "run several times on same-shaped inputs (a test-time augmentation or an ensemble inside the model?). "
                "Give the plain network to mx.Model with flip_axes=(...) for test-time flips or a list of networks for "
                "an ensemble, or pass layer= (with mx.Model(net, aligned_calls=True) if the calls are aligned)")
        grids = [f"{r[1]} {tuple(r[3].shape)}" for r in recs if r[3].ndim in (3, x.ndim)][-8:]
        raise UnsupportedModelError(
            "no layer of the model gives a feature map on the input grid that the output depends on"
            + (f" (before the output head at {next(r[1] for r in recs if r[0] == head)!r})" if head is not None else "")
            + "; pass layer=. Layers with grid-shaped outputs: " + (", ".join(grids) or "none"))
    cands.sort(key=lambda r: r[0])
    proper = [r for r in cands if not isinstance(r[2], POINTWISE)]
    order, name, module, t, view = (proper or cands)[-1]
    centres, note = _geometry_for(view, t, probe, spatial)
    rule = "last feature map before the output head" if dense else "last spatial feature map before global pooling"
    return LayerPlan(name, view, centres, note, f"default: {rule}")
