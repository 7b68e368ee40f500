"""Captum's attribution methods as medexplain methods: adapters, not rewrites.

Registered here: ``inputxgradient``, ``guided_backprop``, ``deconvolution``, ``deeplift``, ``deepliftshap``,
``gradientshap``, ``feature_ablation``, ``kernelshap``, ``lime`` (each over the Captum 0.9 class of the same
name) and ``noise_tunnel`` (SmoothGrad / SmoothGrad-Squared / VarGrad over any registered gradient method,
with the one noise loop :func:`medexplain.engine.ops.noise_sum`). ``lrp`` lives in :mod:`.lrp` on the same
adapter.

Why Captum: it is the maintained PyTorch implementation of these methods (Kokhlikyan et al. 2020,
arXiv:2009.07896), so medexplain only supplies what Captum leaves to every user:

- **the target contract**: :class:`TargetScore` turns any medexplain target (``Class``, ``MultiLabel``,
  ``Region`` of a segmenter) into the scalar-per-row forward Captum needs. The sample each row belongs to
  travels as an additional forward argument, which Captum expands together with the inputs through every
  expansion it makes (baselines, noise samples, perturbations), so per-sample targets and region masks
  follow their sample (``docs/design.md``, "The target contract").
- **N-D feature groups** for the perturbation methods (:func:`feature_groups`): SLIC supervoxels
  (scikit-image, N-D) or a regular grid; Captum's default (every scalar a feature) is unaffordable on a volume.
- **chunking** (``chunk_size`` = rows given to the model in one call): Captum's ``perturbations_per_eval``
  where it has one, otherwise whole samples per call.
- **determinism**: methods that draw from the global RNGs (GradientShap, KernelShap, Lime) run one sample
  at a time inside a forked RNG seeded with ``seed``, so a batch of 3 equals three batches of 1 and the
  caller's RNG state is untouched.
- **the model left as found** (:func:`library_guard`): every hook, attribute (Captum's LRP leaves an
  ``activations`` dict on each layer) and parameter storage a library adds or swaps is removed or
  restored, also when the call raises.
- **cost**: rows through the model (``n_forward``) and through a backward (``n_backward``) are counted by
  the adapter's forward.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from medexplain.engine.core import capture_layers, check_baseline, chunks, forward, n_passes, unwrap
from medexplain.engine.ops import noise_sum
from medexplain.engine.registry import get_method, register
from medexplain.engine.targets import Class, Target
from medexplain.errors import InputError, MedexplainError, UnsupportedModelError

__all__ = ["TargetScore", "RowTarget", "library_guard", "feature_groups", "captum_call", "noise_tunnel_maps"]

#: Module attributes that hold hooks; anything a library adds to them is removed on exit.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
#: Captum's warnings about its own mechanics (input requires_grad, hooks on activations), not the user's.
_CAPTUM_NOISE = (r"Input Tensor \d+ did not already require gradients", r"Setting (forward, )?backward hooks",
                 r".*non-linear activations", r"Consider using tensor.detach")


class TargetScore(nn.Module):
    """The scalar forward a peer library needs: ``forward(x, idx) -> target scores (N,)``.

    ``idx`` holds, for each row of ``x``, the index of the original sample it belongs to (Captum expands it
    together with the inputs), so ``target.scores(select_output(model(x)), idx, batch)`` follows per-sample
    targets through any expansion. The user's model is a child module (``self.model``), so Captum's
    module hooks (DeepLift, GuidedBackprop, LRP) reach the user's layers. Rows are counted in ``cost``:
    ``n_forward`` per call, ``n_backward`` when a gradient flows back through the scores.

    ``relevance_seed=True`` (LRP): the score keeps its value but its gradient with respect to each output
    element becomes that element's share of the score, ``out_v * dS/dout_v / S``. Captum's LRP starts
    the backward with 1 and multiplies the result by the score, which is exact for one logit; for a score
    that sums several outputs (a ``Region``, a ``MultiLabel``) this seeds each output with its own
    relevance ``R_v = out_v dS/dout_v`` (Montavon et al. 2019, section 10.2.2, "explaining a sum of outputs").
    """

    def __init__(self, model: nn.Module, target: Target, batch: int, cost, relevance_seed: bool = False):
        super().__init__()
        self.model = model
        self.target, self.batch, self.cost, self.relevance_seed = target, batch, cost, relevance_seed

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = forward(self.model, x, self.cost)
        idx = idx.to(device=out.device, dtype=torch.long)
        s = self.target.scores(out, idx, self.batch)
        # one class logit per row (a Class target on class scores) is its own relevance seed: the seeding
        # would only divide it by itself (exactly 1 but for the 1e-12 stabiliser)
        if self.relevance_seed and not (type(self.target) is Class and out.ndim == 2):
            s = _relevance_seeded(out, s, self.target, idx, self.batch)
        if s.requires_grad:
            cost, n = self.cost, x.shape[0] * n_passes(self.model)

            def count(_grad):
                cost.n_backward += n
            s.register_hook(count)
        return s


class _PooledScore(TargetScore):
    """:class:`TargetScore` whose model calls are pooled across samples (:func:`captum_call`'s ``pool_rows``):
    in ``record`` mode each call's rows are queued (a placeholder score is returned; the draws of the
    methods that use it do not depend on it) and sent to the model ``pool_rows`` rows at a time; in
    ``replay`` mode each call returns the scores its rows got, in the order they were recorded."""

    def start(self, pool_rows: int) -> None:
        self.mode, self.pool_rows = "record", max(1, int(pool_rows))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sizes: list[int] = []
        self.scores: list[torch.Tensor] = []
        self.calls, self.n_pending = 0, 0

    def _evaluate(self, rows: int) -> None:
        """Send the first ``rows`` queued rows to the model in one call."""
        xs, ids, left, take = [], [], [], rows
        for xq, iq in self.pending:
            n = min(take, xq.shape[0])
            if n:
                xs.append(xq[:n])
                ids.append(iq[:n])
            if n < xq.shape[0]:
                left.append((xq[n:], iq[n:]))
            take -= n
        self.pending, self.n_pending = left, self.n_pending - rows
        with torch.no_grad():
            self.scores.append(TargetScore.forward(self, torch.cat(xs), torch.cat(ids)).detach())

    def flush(self) -> None:
        while self.n_pending:
            self._evaluate(min(self.pool_rows, self.n_pending))
        self.scores = list(torch.cat(self.scores).split(self.sizes)) if self.scores else []

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            self.pending.append((x.detach().clone(), idx.detach().reshape(-1)))
            self.sizes.append(int(x.shape[0]))
            self.n_pending += int(x.shape[0])
            while self.n_pending >= self.pool_rows:
                self._evaluate(self.pool_rows)
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        s = self.scores[self.calls]
        if s.shape[0] != x.shape[0]:   # the seeded draws did not repeat: never expected
            raise UnsupportedModelError("the pooled model calls did not replay in order")
        self.calls += 1
        return s


def _stabilize(t: torch.Tensor, eps: float) -> torch.Tensor:
    """``t + eps`` with the sign of ``t`` (``+eps`` at 0): the LRP stabiliser (Montavon et al. 2019, eq. 5)."""
    return t + ((t == 0).to(t) + t.sign()) * eps


def _relevance_seeded(out, s, target, idx, batch):
    """``s`` with value unchanged and gradient ``out * dS/dout / S`` (see :class:`TargetScore`)."""
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(target.scores(o, idx, batch).sum(), o)
    share = (out.detach() * g) / _stabilize(s.detach(), 1e-12).view(-1, *[1] * (out.ndim - 1))
    seeded = (out * share).flatten(1).sum(1)
    return seeded + (s - seeded).detach()


class RowTarget(Target):
    """``base`` for an expanded batch: row ``i`` of the expanded batch belongs to sample ``rows[i]`` of the
    ``batch`` original samples. Lets any registered method run on noisy copies of a batch (noise tunnel)."""

    def __init__(self, base: Target, rows: torch.Tensor, batch: int):
        self.base, self.rows, self.batch = base, rows, batch

    def scores(self, output, rows=None, batch=None):
        r = self.rows.to(output.device) if rows is None else self.rows.to(output.device)[rows.to(output.device)]
        return self.base.scores(output, r, self.batch)

    def validate(self, output, batch):
        self.base.validate(output, self.batch)

    def class_index(self, batch):
        idx = self.base.class_index(self.batch)
        return None if idx is None else idx[self.rows.to(idx.device)]


@contextlib.contextmanager
def library_guard(model: nn.Module):
    """Leave ``model`` as a peer library found it, also when the body raises.

    On exit every hook added to any module is removed, every module attribute added is deleted and every
    attribute replaced or deleted is put back (Captum's LRP deletes a user's ``rule`` and leaves an
    ``activations`` dict behind), and every parameter and buffer gets its original storage back (LRP's
    gamma and z+ rules assign new ``weight.data``; no rule here writes into the weights in place). Training
    flags and ``requires_grad`` are the business of :func:`medexplain.engine.core.model_guard`, which
    :func:`medexplain.engine.explain` wraps around this.
    """
    mods = list(model.modules())
    attrs = [(m, dict(m.__dict__)) for m in mods]
    # the keys of every hook dict (a module's hook dicts live in its __dict__); most are empty
    hooks = [(m, {h: set(d) for h in _HOOK_DICTS if isinstance(d := m.__dict__.get(h), dict) and d}) for m in mods]
    tensors = [(t, t.data) for t in list(model.parameters()) + list(model.buffers())]
    try:
        yield model
    finally:
        for m, keys in hooks:
            md = m.__dict__
            for h in _HOOK_DICTS:
                d = md.get(h)
                if isinstance(d, dict) and d:
                    before = keys.get(h, ())
                    for k in [k for k in d if k not in before]:
                        del d[k]
        missing = object()
        for m, saved in attrs:
            for k in [k for k in m.__dict__ if k not in saved]:
                del m.__dict__[k]
            for k, v in saved.items():
                if m.__dict__.get(k, missing) is not v:
                    m.__dict__[k] = v
        with torch.no_grad():
            for t, data in tensors:
                if t.data.data_ptr() != data.data_ptr() or t.data.shape != data.shape:
                    t.data = data


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        for msg in _CAPTUM_NOISE:
            warnings.filterwarnings("ignore", message=msg)
        yield


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """Torch's and NumPy's global RNGs seeded with ``seed`` inside, restored on exit (Captum draws from them)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            np.random.seed(int(seed) % 2 ** 32)
            yield
    finally:
        np.random.set_state(state)


def _library_error(e: Exception, what: str) -> MedexplainError:
    return UnsupportedModelError(f"{what} failed on this model: {type(e).__name__}: {e}")


def captum_call(model, x, target, cost, make: Callable, call: Callable, rows_per_sample: int = 1,
                chunk_size: int | None = None, seed: int | None = None,
                relevance_seed: bool = False, pool_rows: int | None = None) -> torch.Tensor:
    """Run a Captum attribution over ``x`` on medexplain's terms; returns the maps ``(B, C, *s)``.

    ``make(forward_module)`` builds the Captum object over a :class:`TargetScore`; ``call(obj, x_chunk,
    idx_chunk, chunk_slice)`` runs it on a chunk of samples with ``additional_forward_args=(idx,)``.
    Chunks hold ``chunk_size // rows_per_sample`` samples (at least one), or one sample when ``seed`` is
    given (the global RNGs are seeded per sample). Everything runs inside :func:`library_guard`.

    ``pool_rows`` (with ``seed``, a method whose draws do not depend on the model's outputs: KernelSHAP,
    LIME): the samples' perturbed rows are pooled across the batch into model calls of ``pool_rows`` rows
    (:class:`_PooledScore`): a first pass over the samples, each under its seeded RNG, records the rows
    Captum asks for; they go through the model ``pool_rows`` at a time, across samples; a second pass makes
    the same seeded draws and reads the scores back. The maps are those of one sample at a time. Pooled only
    where it makes fewer model calls than one sample at a time (``rows_per_sample`` rows each, in calls of
    ``pool_rows``): otherwise the second pass of Captum's draws and surrogate fit would be pure cost.
    """
    b = x.shape[0]
    pooled = seed is not None and pool_rows is not None and b > 1 \
        and -(-b * rows_per_sample // pool_rows) < b * -(-rows_per_sample // pool_rows)
    module = (_PooledScore if pooled else TargetScore)(model, target, b, cost, relevance_seed=relevance_seed)
    per = 1 if seed is not None else max(1, (chunk_size or rows_per_sample * b) // max(1, rows_per_sample))

    def run_all(obj):
        maps = []
        for sl in chunks(b, per):
            idx = torch.arange(sl.start, sl.stop, device=x.device)
            with seeded_rng(seed, x.device):
                try:
                    a = call(obj, x[sl].detach().clone(), idx, sl)
                except MedexplainError:
                    raise
                except (RuntimeError, TypeError, AssertionError, ValueError) as e:
                    raise _library_error(e, type(obj).__name__) from e
            maps.append(a.detach())
        return torch.cat(maps)

    with library_guard(model), _quiet():
        obj = make(module)
        if not pooled:
            return run_all(obj)
        module.start(pool_rows)
        run_all(obj)            # record: every sample's perturbed rows, pooled into calls of pool_rows rows
        module.flush()
        module.mode = "replay"  # the same seeded draws again, the model's scores read back in order
        return run_all(obj)


def _slice_baseline(baselines, x: torch.Tensor, sl: slice):
    """A scalar, or a tensor broadcastable to ``x`` (a batch-sized one is sliced with the chunk)."""
    if isinstance(baselines, torch.Tensor) and baselines.ndim == x.ndim and baselines.shape[0] == x.shape[0] > 1:
        return baselines[sl]
    return baselines


def _check_baselines(baselines, x: torch.Tensor, named: bool = False):
    """``baselines`` checked (:func:`medexplain.engine.core.check_baseline`); ``named``: the perturbation methods also take
    the named baselines ("zero", "mean", "median", "blur") of :func:`medexplain.methods.occlusion.perturbation_baseline`."""
    if named and isinstance(baselines, str):
        from medexplain.methods.occlusion import perturbation_baseline
        return perturbation_baseline(x, baselines)[0]
    return check_baseline(baselines, x, "baselines")


def reference_distribution(x: torch.Tensor, baselines=None, n_baselines: int = 8, seed: int = 0) -> torch.Tensor:
    """Reference images ``(M, C, *s)`` for DeepLiftShap / GradientShap, shared by every sample.

    ``baselines`` (the user's background set, ``(M, C, *s)``) is used as given. By default: the zero image
    and ``n_baselines - 1`` standard-normal images drawn from a generator seeded with ``seed``, i.e. a
    reference distribution at the scale of z-scored intensities; pass a background set of real images when
    the data are not z-scored (Lundberg & Lee 2017 explain against a background distribution).
    """
    if baselines is not None:
        ref = torch.as_tensor(baselines, dtype=x.dtype, device=x.device)
        if ref.ndim == x.ndim - 1:
            ref = ref.unsqueeze(0)
        if ref.ndim != x.ndim or tuple(ref.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(f"baselines must be (M, {', '.join(map(str, x.shape[1:]))}), got {tuple(ref.shape)}")
        return ref
    if n_baselines < 1:
        raise InputError(f"n_baselines must be >= 1, got {n_baselines}")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn((n_baselines - 1, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
    return torch.cat([torch.zeros_like(x[:1]), noise])


# ----------------------------------------------------------------------------------------------- gradients


@register("inputxgradient", family="gradient")
def inputxgradient(model, x, target, cost, chunk_size: int | None = 64):
    """Input x gradient (Shrikumar et al. 2016, arXiv:1605.01713; Ancona et al. 2018, eq. 3): ``x * dS/dx``,
    Captum's ``InputXGradient``. ``chunk_size`` samples per call."""
    from captum.attr import InputXGradient
    m = captum_call(model, x, target, cost, InputXGradient,
                    lambda o, xs, idx, sl: o.attribute(xs, additional_forward_args=(idx,)), 1, chunk_size)
    return m, {}


@register("guided_backprop", needs_hooks=True, family="propagation")
def guided_backprop(model, x, target, cost, chunk_size: int | None = 64):
    """Guided backpropagation (Springenberg et al. 2015, section 3.4, eq. for R_i^l): the gradient with every
    ReLU passing only positive gradients where its input was positive; Captum's ``GuidedBackprop`` (hooks
    on the model's ``nn.ReLU`` modules; functional ReLUs are not modified)."""
    from captum.attr import GuidedBackprop
    m = captum_call(model, x, target, cost, GuidedBackprop,
                    lambda o, xs, idx, sl: o.attribute(xs, additional_forward_args=(idx,)), 1, chunk_size)
    return m, {}


@register("deconvolution", needs_hooks=True, family="propagation")
def deconvolution(model, x, target, cost, chunk_size: int | None = 64):
    """Deconvnet (Zeiler & Fergus 2014, section 2.1; as formulated by Springenberg et al. 2015, section 3.4):
    the backward pass with every ReLU applied to the gradient itself; Captum's ``Deconvolution``."""
    from captum.attr import Deconvolution
    m = captum_call(model, x, target, cost, Deconvolution,
                    lambda o, xs, idx, sl: o.attribute(xs, additional_forward_args=(idx,)), 1, chunk_size)
    return m, {}


def _reused_nonlinearities(model, x) -> list[str]:
    """Names of the nonlinearity modules DeepLIFT hooks that run more than once in one forward (counted
    with :func:`medexplain.engine.core.capture_layers` on one sample)."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
    names = [n for n, m in unwrap(model).named_modules() if n and type(m) in SUPPORTED_NON_LINEAR]
    if not names:
        return []
    with capture_layers(model, names, mode="detach") as caps, torch.no_grad():
        forward(model, x[:1])
    return [n for n, c in caps.items() if c.calls > 1]


def _deeplift_call(model, x, *args, **kwargs):
    try:
        return captum_call(model, x, *args, **kwargs)
    except UnsupportedModelError as e:
        if "input/output attributes" not in str(e):
            raise
        shared = _reused_nonlinearities(model, x)
        raise UnsupportedModelError(
            "DeepLIFT needs each nonlinearity module to run once per forward (its rescale rule stores the "
            f"module's input and output); this model calls {shared or 'a nonlinearity module'} more than once "
            "(a shared nn.ReLU). Give each use its own module, or use another method") from e


#: DeepLIFT's defining property (section 3.1), lost in a half-precision forward
_DEEPLIFT_AMP = ("its summation-to-delta (the contributions sum to the change of the score) would hold only to half "
                 "precision")


@register("deeplift", needs_hooks=True, family="propagation", no_amp=_DEEPLIFT_AMP)
def deeplift(model, x, target, cost, baselines=0.0, chunk_size: int | None = 64):
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017, section 3.3, eq. 1-3): contributions
    ``C = m * (x - x')`` with multipliers propagated by the chain rule for multipliers; Captum's
    ``DeepLift`` (hooks on the model's nonlinearity modules). ``baselines``: a scalar or a tensor
    broadcastable to ``x`` (zero by default). Two rows per sample (input and reference) in one call."""
    from captum.attr import DeepLift
    base = _check_baselines(baselines, x)
    m = _deeplift_call(model, x, target, cost, DeepLift,
                    lambda o, xs, idx, sl: o.attribute(xs, baselines=_slice_baseline(base, x, sl),
                                                       additional_forward_args=(idx,)), 2, chunk_size)
    return m, {"baselines": "scalar" if isinstance(base, float) else tuple(base.shape)}


@register("deepliftshap", needs_hooks=True, family="propagation", no_amp=_DEEPLIFT_AMP)
def deepliftshap(model, x, target, cost, baselines=None, n_baselines: int = 8, seed: int = 0,
                 chunk_size: int | None = 64):
    """DeepSHAP (Lundberg & Lee 2017, section 4.2, "Deep SHAP"): DeepLIFT averaged over a reference
    distribution; Captum's ``DeepLiftShap``. References: :func:`reference_distribution` (``baselines`` or
    ``n_baselines`` seeded draws, shared by every sample). ``2 M`` rows per sample in one call."""
    from captum.attr import DeepLiftShap
    ref = reference_distribution(x, baselines, n_baselines, seed)
    m = _deeplift_call(model, x, target, cost, DeepLiftShap,
                    lambda o, xs, idx, sl: o.attribute(xs, baselines=ref, additional_forward_args=(idx,)),
                    2 * ref.shape[0], chunk_size)
    return m, {"n_baselines": ref.shape[0]}


@register("gradientshap", family="gradient")
def gradientshap(model, x, target, cost, baselines=None, n_baselines: int = 8, n_samples: int = 20,
                 stdevs: float = 0.0, seed: int = 0):
    """GradientSHAP / expected gradients (Lundberg & Lee 2017; Erion et al. 2021, eq. 4): the expectation of
    ``(x - x') * grad S(x' + a (x + eps - x'))`` over references ``x'``, ``a ~ U(0, 1)`` and
    ``eps ~ N(0, stdevs^2)``; Captum's ``GradientShap`` with ``n_samples`` draws per sample.

    Captum draws from torch's and NumPy's global RNGs, so each sample runs alone inside an RNG seeded with
    ``seed`` (restored afterwards): a sample's map never depends on the rest of the batch. Its
    ``n_samples`` rows go through the model in one call (Captum has no batching knob here)."""
    from captum.attr import GradientShap
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")
    ref = reference_distribution(x, baselines, n_baselines, seed)
    m = captum_call(model, x, target, cost, GradientShap,
                    lambda o, xs, idx, sl: o.attribute(xs, baselines=ref, n_samples=n_samples, stdevs=float(stdevs),
                                                       additional_forward_args=(idx,)),
                    n_samples, None, seed=seed)
    return m, {"n_samples": n_samples, "n_baselines": ref.shape[0], "seed": seed}


# ------------------------------------------------------------------------------------------ perturbation


def feature_groups(x: torch.Tensor, features="slic", n_features: int = 64, compactness: float = 0.3) -> torch.Tensor:
    """Feature groups for the perturbation methods: ``(B, 1, *s)`` integer ids ``0..F_b - 1`` per sample.

    ``features="slic"``: SLIC supervoxels (Achanta et al. 2012) from scikit-image on each sample (N-D,
    all channels, each image min-max scaled to [0, 1] first so ``compactness`` means the same for every
    image), about ``n_features`` segments; ``"grid"``: a regular grid of ``round(n_features ** (1/d))``
    cells per spatial axis; or a tensor ``(B or 1, 1, *s)`` / ``(B or 1, *s)`` of ids given by the caller.
    Ids are relabelled to be contiguous per sample.
    """
    b, spatial = x.shape[0], tuple(x.shape[2:])
    if isinstance(features, torch.Tensor):
        g = features.to(device=x.device)
        if g.ndim == len(spatial) + 1:
            g = g.unsqueeze(1)
        if g.ndim != x.ndim or g.shape[1] != 1 or tuple(g.shape[2:]) != spatial or g.shape[0] not in (1, b):
            raise InputError(f"feature groups must be (B or 1, 1, {', '.join(map(str, spatial))}), got {tuple(g.shape)}")
        if torch.is_floating_point(g) and not torch.equal(g, g.round()):
            raise InputError("feature groups must hold integer ids")
        g = g.long().expand(b, *g.shape[1:])
    elif features == "grid":
        if n_features < 1:
            raise InputError(f"n_features must be >= 1, got {n_features}")
        k = max(1, round(n_features ** (1 / len(spatial))))
        ids = torch.zeros(spatial, dtype=torch.long, device=x.device)
        for axis, s in enumerate(spatial):
            cell = torch.div(torch.arange(s, device=x.device) * min(k, s), s, rounding_mode="floor")
            ids = ids * min(k, s) + cell.view(*[1] * axis, s, *[1] * (len(spatial) - axis - 1))
        g = ids.expand(b, 1, *spatial)
    elif features == "slic":
        from skimage.segmentation import slic
        if n_features < 1:
            raise InputError(f"n_features must be >= 1, got {n_features}")
        out = []
        for img in x.detach().double().cpu().numpy():
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            seg = slic(img, n_segments=int(n_features), compactness=float(compactness), channel_axis=0, start_label=0)
            out.append(torch.from_numpy(np.ascontiguousarray(seg)).long())
        g = torch.stack(out).unsqueeze(1).to(x.device)
    else:
        raise InputError(f"features must be 'slic', 'grid' or a tensor of ids, got {features!r}")
    flat = g.flatten(1)
    relabelled = torch.stack([torch.unique(r, return_inverse=True)[1] for r in flat])
    return relabelled.view(b, 1, *spatial)


def _groups_info(groups: torch.Tensor, features) -> dict:
    n = (groups.flatten(1).amax(1) + 1).tolist()
    return {"features": features if isinstance(features, str) else "given", "n_features": n}


@register("feature_ablation", needs_grad=False, family="perturbation")
def feature_ablation(model, x, target, cost, features="slic", n_features: int = 64, compactness: float = 0.3,
                     baselines=0.0, chunk_size: int | None = 64):
    """Feature ablation (Zeiler & Fergus 2014's occlusion over arbitrary feature groups): each group's
    attribution is ``S(x) - S(x with the group set to the baseline)``, on every voxel of the group
    (``baselines``: a number, ``"mean"``, ``"median"``, ``"blur"`` or a tensor,
    :func:`medexplain.methods.occlusion.perturbation_baseline`);
    Captum's ``FeatureAblation`` over :func:`feature_groups` (all channels of a voxel together).
    ``perturbations_per_eval = chunk_size // B``. Maps are ``(B, 1, *s)``."""
    from captum.attr import FeatureAblation
    groups = feature_groups(x, features, n_features, compactness)
    base = _check_baselines(baselines, x, named=True)
    ppe = max(1, (chunk_size or x.shape[0]) // x.shape[0])
    m = captum_call(model, x, target, cost, FeatureAblation,
                    lambda o, xs, idx, sl: o.attribute(xs, baselines=_slice_baseline(base, x, sl), feature_mask=groups[sl],
                                                       perturbations_per_eval=ppe, additional_forward_args=(idx,)),
                    1, None)
    return m[:, :1], {**_groups_info(groups, features), "baseline": _baseline_text(baselines, x)}


def _baseline_text(baselines, x) -> str:
    from medexplain.methods.occlusion import perturbation_baseline
    if isinstance(baselines, torch.Tensor):
        return f"given tensor {tuple(baselines.shape)}"
    return perturbation_baseline(x[:1, :1], baselines)[1]


def _needs_sklearn(model, output) -> str | None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "needs scikit-learn (Captum fits the KernelSHAP / LIME surrogate with it)"
    return None


def _surrogate(name, cls, model, x, target, cost, features, n_features, compactness, n_samples, baselines, seed,
               chunk_size):
    if _needs_sklearn(None, None):
        raise UnsupportedModelError(f"{name}: " + _needs_sklearn(None, None))
    if n_samples < 2:
        raise InputError(f"n_samples must be >= 2, got {n_samples}")
    groups = feature_groups(x, features, n_features, compactness)
    few = (groups.flatten(1).amax(1) < 1).nonzero().flatten().tolist()
    if few:
        raise InputError(f"{name}: the feature groups of sample(s) {few} hold a single feature; a surrogate needs at "
                         "least two (raise n_features, or use features='grid')")
    base = _check_baselines(baselines, x, named=True)
    m = captum_call(model, x, target, cost, cls,
                    lambda o, xs, idx, sl: o.attribute(xs, baselines=_slice_baseline(base, x, sl), feature_mask=groups[sl],
                                                       n_samples=int(n_samples), perturbations_per_eval=max(1, chunk_size or 1),
                                                       additional_forward_args=(idx,)),
                    int(n_samples), None, seed=seed, pool_rows=chunk_size or int(n_samples) * x.shape[0])
    return m[:, :1], {**_groups_info(groups, features), "n_samples": n_samples, "seed": seed,
                      "baseline": _baseline_text(baselines, x)}


def _surrogate_cost(x_shape, o):
    """``n_samples`` coalitions per sample, no extra pass."""
    return int(o["n_samples"]) * x_shape[0], 0


@register("kernelshap", needs_grad=False, applies_to=_needs_sklearn, family="surrogate", cost=_surrogate_cost)
def kernelshap(model, x, target, cost, features="slic", n_features: int = 64, compactness: float = 0.3,
               n_samples: int = 200, baselines=0.0, seed: int = 0, chunk_size: int | None = 64):
    """Kernel SHAP (Lundberg & Lee 2017, theorem 2: the Shapley kernel weighted linear regression) over
    :func:`feature_groups`; Captum's ``KernelShap`` (coalitions from the global RNG, so each sample runs
    alone in an RNG seeded with ``seed``), ``perturbations_per_eval = chunk_size``; the model calls are filled
    to ``chunk_size`` rows across the samples of the batch (:func:`captum_call`'s ``pool_rows``). Absent features
    take the baseline (as :func:`feature_ablation`'s). Maps are ``(B, 1, *s)``, constant on each group."""
    from captum.attr import KernelShap
    return _surrogate("kernelshap", KernelShap, model, x, target, cost, features, n_features, compactness, n_samples,
                      baselines, seed, chunk_size)


@register("lime", needs_grad=False, applies_to=_needs_sklearn, family="surrogate", cost=_surrogate_cost)
def lime(model, x, target, cost, features="slic", n_features: int = 64, compactness: float = 0.3,
         n_samples: int = 200, baselines=0.0, seed: int = 0, chunk_size: int | None = 64):
    """LIME (Ribeiro et al. 2016, eq. 1-2): a sparse linear surrogate (Lasso, alpha 0.01) fitted to the model
    on random on/off coalitions of :func:`feature_groups`, weighted by an exponential kernel on cosine
    distance (width 1); Captum's ``Lime`` defaults. Seeded and chunked as :func:`kernelshap`."""
    from captum.attr import Lime
    return _surrogate("lime", Lime, model, x, target, cost, features, n_features, compactness, n_samples, baselines,
                      seed, chunk_size)


# ------------------------------------------------------------------------------------------ noise tunnel

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def noise_tunnel_maps(fn: Callable, model, x, target, cost, nt_type: str = "smoothgrad", n_samples: int = 10,
                      sigma: float = 0.15, seed: int = 0, chunk_size: int | None = 64, noise=None,
                      options: dict | None = None) -> torch.Tensor:
    """Noise tunnel over an explainer ``fn(model, x, target, cost, **options) -> (map, info)``.

    ``n_samples`` noisy copies ``x + eps_n`` from the one noise loop :func:`medexplain.engine.ops.noise_sum`
    (``sd = sigma x (max - min)`` per sample, one draw per noise sample shared by the batch; ``noise``
    replaces the draws), explained together as one expanded batch (``chunk_size // B`` noise samples per call, the rows
    following their sample through :class:`RowTarget`). Aggregation (Captum's ``NoiseTunnel`` types):
    ``smoothgrad`` = mean of the maps (Smilkov et al. 2017, eq. 3), ``smoothgrad_sq`` = mean of their
    squares, ``vargrad`` = their variance ``E[m^2] - E[m]^2`` (Adebayo et al. 2018, "Local explanation
    methods for deep neural networks lack sensitivity to parameter values", eq. 1).
    """
    if nt_type not in NT_TYPES:
        raise InputError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
    b = x.shape[0]

    def maps(noisy, rows, n):
        m, _ = fn(model, noisy, RowTarget(target, rows, b), cost, **(options or {}))
        m = m.detach().view(n, b, *m.shape[1:])
        return m.sum(0), (m * m).sum(0)

    total, total_sq = noise_sum(x, maps, n_samples, sigma, seed, chunk_size, scale="sample", noise=noise)
    mean, mean_sq = total / n_samples, total_sq / n_samples
    return {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean * mean}[nt_type]


@register("noise_tunnel", family="gradient")
def noise_tunnel(model, x, target, cost, base: str = "saliency", nt_type: str = "smoothgrad", n_samples: int = 10,
                 sigma: float = 0.15, seed: int = 0, chunk_size: int | None = 64, noise=None,
                 base_options: dict | None = None):
    """SmoothGrad / SmoothGrad-Squared / VarGrad over any registered gradient method ``base`` (Captum's
    ``NoiseTunnel`` types, computed by :func:`noise_tunnel_maps` with the one noise source). ``base_options``
    go to the base method (e.g. ``{"layer": "features.7"}`` for ``gradcam``, ``{"steps": 16}`` for
    ``integrated_gradients``)."""
    spec = get_method(base)
    if spec.fn is noise_tunnel or not spec.needs_grad:
        raise InputError(f"noise_tunnel applies to gradient methods; {spec.name!r} is not one")
    accepted = spec.options()
    opts = dict(base_options or {})
    if accepted is not None and set(opts) - set(accepted):
        raise InputError(f"method {spec.name!r} has no option(s) {sorted(set(opts) - set(accepted))}; it accepts {accepted}")
    m = noise_tunnel_maps(spec.fn, model, x, target, cost, nt_type, n_samples, sigma, seed, chunk_size, noise, opts)
    return m, {"base": spec.name, "nt_type": nt_type, "n_samples": n_samples, "sigma": sigma, "seed": seed}
