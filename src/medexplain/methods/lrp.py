"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019, "Layer-Wise Relevance
Propagation: An Overview") on Captum's ``LRP``, N-D, with the standard composites.

Captum 0.9's ``LRP`` has default rules only for 2D layers (``Conv2d``, ``AvgPool2d``, ``BatchNorm2d``, ...)
and raises ``TypeError`` on a ``Conv3d``. Zennit has the composites but cannot be installed here: its
package ``__init__`` imports torchvision, which would replace our torch. So this module assigns rules to
every leaf layer through Captum's own mechanism (a ``rule`` attribute per layer, which Captum reads before
its defaults) and lets Captum run the propagation; :func:`medexplain.methods.captum_methods.library_guard`
removes every rule, hook and attribute afterwards and puts back any rule the user had set.

Composites (the layer maps of Zennit's ``composites.py``, after Montavon et al. 2019, section 10.2):

- ``epsilon``: Captum's defaults, extended to 1D/3D layers: LRP-epsilon on every linear, convolutional,
  pooling and norm layer (Captum's ``EpsilonRule``, epsilon 1e-9 unless given). On a 2D model equal to
  ``captum.attr.LRP`` (tests).
- ``epsilon_plus_flat`` (Zennit ``EpsilonPlusFlat``; the default): flat rule on the first linear/conv layer, z+ on the
  other convolutions, epsilon (1e-6) on fully connected layers.
- ``epsilon_gamma_box`` (Zennit ``EpsilonGammaBox``): z^B (box) rule on the first convolution with bounds
  ``low``/``high`` (default: each sample's min and max), gamma (0.25, Captum's ``GammaRule``) on the
  other convolutions, epsilon on fully connected layers.
- ``epsilon_alpha2_beta1`` (Zennit ``EpsilonAlpha2Beta1``): alpha=2, beta=1 on convolutions, epsilon on
  fully connected layers.

In every composite, pooling, upsampling (nearest or linear ``nn.Upsample``, as MONAI's ``UpSample`` wraps it),
padding and reshaping layers get LRP-epsilon with a stabiliser only (Zennit's ``Norm`` rule): they are linear
with non-negative weights, so this is their z-rule, and for nearest upsampling it hands each input the summed
relevance of its copies; ReLU / Tanh / Dropout get Captum's pass-through; the other elementwise
activations of :data:`medexplain.engine.core.ACTIVATION`, norm layers (no canonizer merges a batch norm into the
preceding layer, Zennit's ``SequentialMergeBatchNorm``) and identity layers (``nn.Identity``,
``nn.Dropout3d`` in eval) pass relevance through unchanged (Zennit's ``Pass``). The exception is the batch
norm under ``epsilon``, which keeps Captum's default (epsilon); LRP-epsilon on a mean-subtracting norm
(instance, group, layer norm) would send almost no relevance through.

Residual networks (:func:`residual_canonizer`, Zennit's canonizers): an addition written in a block's
``forward`` is no module, so Captum has no rule for it and counts relevance through both summands (the zoo
ResNet's map summed to 1.3e4 for a logit of 7.95). For the blocks medexplain meets (MONAI's ``ResNetBlock``,
``ResNetBottleneck``, ``ResidualUnit``, ``SkipConnection`` and SegResNet's ``ResBlock``) the canonizer routes
the addition through a :class:`ResidualSum` module, which gets LRP-epsilon (Zennit's ``Sum`` with its ``Norm`` rule): each summand
receives ``R_i = z_i R / (sum_j z_j + eps)``, the proportional split of Montavon et al. 2019, eq. 5 with unit
weights. It also gives each consumer of the block input its own :class:`BranchPoint` copy, so relevance from
the two paths is added at the input (Captum's rules multiply by a layer's input in a tensor hook shared by
every consumer of that tensor, which is exact only when every consumer is a Captum epsilon-type layer). The
blocks get their forward back on exit, also after an error. Any other addition of two computed tensors in
the forward is counted on one probe row and named in a warning: relevance is not conserved through it.

The rules Captum lacks are written here as Captum ``PropagationRule`` subclasses: alpha-beta (with alpha=1,
beta=0 it is z+ for signed inputs), flat and z^B compute the relevance of their layer's input with the
layer's functional form (``F.linear``, ``_conv_forward``, ``F.conv_transpose``) under modified weights,
following Montavon et al. 2019, eq. 4-9; the pass-through replaces Captum's ``IdentityRule``, which loses
the relevance after an ``nn.Dropout`` (it does not mark the replaced gradient, so the Dropout's hook
forwards the raw gradient).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from medexplain.engine.core import ACTIVATION, CONV, CONV_TRANSPOSE, NORM, POOL
from medexplain.engine.registry import register
from medexplain.errors import InputError, UnsupportedModelError
from medexplain.methods.captum_methods import _stabilize, captum_call

__all__ = ["lrp", "COMPOSITES", "lrp_rules", "residual_canonizer", "ResidualSum", "BranchPoint"]

COMPOSITES = ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
#: Layers relevance passes through unchanged (elementwise), Captum's built-in nonlinear pass-through.
_CAPTUM_PASS = (nn.ReLU, nn.Dropout, nn.Tanh)
_ELEMENTWISE = ACTIVATION + (nn.Sigmoid,)
#: Layers whose output is their input tensor itself in eval: relevance passes through them untouched.
_SAME_TENSOR = (nn.Identity, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: Linear layers without weights to modify (pooling, upsampling, padding, reshaping): LRP-epsilon with a stabiliser
#: only, the z-rule of a linear map with non-negative weights. For nearest upsampling (and padding, pixel shuffle)
#: each output is a copy of one input, so the rule passes the relevance of the copies back to their input, summed.
_NORM_LIKE = POOL + (nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ConstantPad1d,
                     nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                     nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
_WEIGHTED = CONV + CONV_TRANSPOSE + (nn.Linear,)


def _layer_forward(module: nn.Module, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The layer's own function of ``a`` with ``weight``/``bias`` in place of its parameters (no hooks)."""
    if isinstance(module, nn.Linear):
        return F.linear(a, weight, bias)
    if isinstance(module, CONV):
        return module._conv_forward(a, weight, bias)
    if isinstance(module, CONV_TRANSPOSE):
        fn = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
              nn.ConvTranspose3d: F.conv_transpose3d}[type(module)]
        return fn(a, weight, bias, module.stride, module.padding, module.output_padding, module.groups, module.dilation)
    raise UnsupportedModelError(f"no LRP rule implementation for {type(module).__name__}")


@functools.cache
def _make_rule_classes():
    """The rule classes Captum lacks, made once (they subclass Captum's ``PropagationRule``, imported on first use)."""
    from captum.attr._utils.lrp_rules import PropagationRule

    class ModifiedRule(PropagationRule):
        """A rule ``R_in = reduce_k(in_k * d/d in_k [z_k(in_k; theta_k) . s_k])`` with ``s_k = R_out / z``
        (the general form of Montavon et al. 2019, eq. 8), computed in the backward hook of the layer
        input from the layer output's relevance. Subclasses give the terms."""

        def __init__(self, stabilizer: float = 1e-6):
            self.stabilizer = stabilizer

        def _manipulate_weights(self, module, inputs, outputs):  # the terms modify weights functionally
            pass

        def forward_hook(self, module, inputs, outputs):
            self._module = module
            return super().forward_hook(module, inputs, outputs)

        def _create_backward_hook_output(self, outputs):
            def hook(grad):
                self._relevance_out = grad.detach()
                self.relevance_output[grad.device] = grad.data
                return grad
            return hook

        def _create_backward_hook_input(self, inputs):
            def hook(grad):
                rel = self.relevance(self._module, inputs, self._relevance_out)
                if self._has_single_input:
                    self.relevance_input[grad.device] = rel.data
                grad.replace_out = rel
                return rel
            return hook

        def _vjp(self, module, a, weight, bias, cotangent):
            with torch.enable_grad():
                a = a.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(_layer_forward(module, a, weight, bias), a, cotangent)
            return g

        @staticmethod
        def _params(module):
            w = module.weight.detach()
            b = module.bias.detach() if getattr(module, "bias", None) is not None else None
            return w, b

    class AlphaBetaRule(ModifiedRule):
        """LRP-alpha-beta (Bach et al. 2015, eq. 60; Montavon et al. 2019, eq. 9 for alpha=1, beta=0 = z+):
        positive and negative contributions (``a+ w+ + a- w-`` and ``a+ w- + a- w+``, bias split by sign)
        normalised separately, weighted ``alpha`` and ``-beta``; Zennit's ``AlphaBeta`` terms."""

        def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
            if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
                raise InputError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got {alpha}, {beta}")
            super().__init__(stabilizer)
            self.alpha, self.beta = alpha, beta

        def relevance(self, module, a, r):
            w, b = self._params(module)
            ap, an = a.clamp(min=0), a.clamp(max=0)
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            bp = None if b is None else b.clamp(min=0)
            bn = None if b is None else b.clamp(max=0)
            zp = _layer_forward(module, ap, wp, bp) + _layer_forward(module, an, wn, None)
            zn = _layer_forward(module, ap, wn, bn) + _layer_forward(module, an, wp, None)
            sp, sn = r / _stabilize(zp, self.stabilizer), r / _stabilize(zn, self.stabilizer)
            pos = ap * self._vjp(module, ap, wp, bp, sp) + an * self._vjp(module, an, wn, None, sp)
            neg = ap * self._vjp(module, ap, wn, bn, sn) + an * self._vjp(module, an, wp, None, sn)
            return self.alpha * pos - self.beta * neg

    class FlatRule(ModifiedRule):
        """LRP-flat (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors", section "Methods"): relevance
        spread uniformly over each output's receptive field, ``R_j = sum_k 1 / (sum_j' 1) R_k``."""

        def relevance(self, module, a, r):
            w, _ = self._params(module)
            ones_w, ones_a = torch.ones_like(w), torch.ones_like(a)
            z = _layer_forward(module, ones_a, ones_w, None)
            return self._vjp(module, ones_a, ones_w, None, r / _stabilize(z, self.stabilizer))

    class ZBoxRule(ModifiedRule):
        """LRP-z^B for inputs bounded in ``[low, high]`` (Montavon et al. 2017, "Explaining nonlinear
        classification decisions with deep Taylor decomposition", eq. for R_i with z^B; Montavon et al. 2019,
        table 1): ``z = a w - l w+ - h w-``."""

        def __init__(self, low, high, stabilizer: float = 1e-6):
            super().__init__(stabilizer)
            self.low, self.high = low, high

        def relevance(self, module, a, r):
            w, b = self._params(module)
            low = torch.as_tensor(self.low, dtype=a.dtype, device=a.device).expand_as(a)
            high = torch.as_tensor(self.high, dtype=a.dtype, device=a.device).expand_as(a)
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            z = _layer_forward(module, a, w, b) - _layer_forward(module, low, wp, b) - _layer_forward(module, high, wn, b)
            s = r / _stabilize(z, self.stabilizer)
            return a * self._vjp(module, a, w, b, s) - low * self._vjp(module, low, wp, b, s) \
                - high * self._vjp(module, high, wn, b, s)

    class PassRule(PropagationRule):
        """Pass-through (Zennit's ``Pass``): ``R_in = R_out`` for layers whose output has the input's shape
        (elementwise activations, norm layers). No tensor hooks: the layer's output is returned as
        ``a + (y - a).detach()``, whose value is ``y`` and whose gradient is the identity, so the relevance
        arriving at the output reaches the input unchanged. Without hooks or stored activations a module
        called several times in one forward (MONAI's blocks reuse one activation module) is fine. Captum's
        ``IdentityRule`` does not mark the replaced gradient (``replace_out``), so a Captum pass-through layer
        before it (an ``nn.Dropout``) forwarded the raw gradient instead of the relevance."""

        tensor_hooks = False

        def _manipulate_weights(self, module, inputs, outputs):
            pass

        def forward_hook_weights(self, module, inputs, outputs):    # nothing to store: no reuse check needed
            pass

        def forward_pre_hook_activations(self, module, inputs):    # the value passed on does not matter
            return None

        def pre_hook(self, module, args):
            """Keep the layer's input and hand the layer a copy: an in-place layer (``LeakyReLU(inplace=True)``,
            as MONAI builds them) then modifies the copy, and the pass-through starts from the untouched input
            rather than from the activation's output (whose gradient is the activation's derivative)."""
            self._input = args[0]
            return (args[0].clone(), *args[1:]) if isinstance(args[0], torch.Tensor) else None

        def forward_hook(self, module, inputs, outputs):
            a = getattr(self, "_input", None)
            a = a if isinstance(a, torch.Tensor) else (inputs[0] if isinstance(inputs, tuple) else inputs)
            self._input = None
            if not isinstance(outputs, torch.Tensor) or a.shape != outputs.shape:
                raise UnsupportedModelError(f"LRP pass-through: {type(module).__name__} changes the tensor's shape "
                                            f"{tuple(a.shape)} -> {tuple(getattr(outputs, 'shape', ()))}")
            return a + (outputs - a).detach()

    class TransparentRule(PropagationRule):
        """For layers that return their input tensor itself in eval (``nn.Identity``, ``nn.Dropout2d``, ...):
        no tensor hooks (an input and an output hook on the same tensor would run in the wrong order), only
        a fresh output, so relevance flows through unchanged."""

        tensor_hooks = False

        def _manipulate_weights(self, module, inputs, outputs):
            pass

        def forward_hook_weights(self, module, inputs, outputs):    # nothing to store: reuse is fine
            pass

        def forward_pre_hook_activations(self, module, inputs):
            return None

        def forward_hook(self, module, inputs, outputs):
            return outputs.clone()

    return AlphaBetaRule, FlatRule, ZBoxRule, PassRule, TransparentRule


class ResidualSum(nn.Module):
    """``a + b`` of a residual block as a module, so LRP can give it a rule (Zennit's ``Sum``; the stack and
    sum, not ``+``, keep it out of :func:`_probe`'s count)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack((a, b)).sum(0)


class BranchPoint(nn.Identity):
    """One consumer's copy of a tensor that two paths of a block read (an ``nn.Identity``: it gets the
    transparent rule, a fresh output and no tensor hooks), so each path's relevance arrives at the tensor
    already as relevance and the two add up."""


def _resnet_block(blk, x):
    xa, xb = blk.mx_branch_a(x), blk.mx_branch_b(x)
    out = blk.act(blk.bn1(blk.conv1(xa)))
    out = blk.bn2(blk.conv2(out))
    if hasattr(blk, "conv3"):  # ResNetBottleneck
        out = blk.bn3(blk.conv3(blk.act(out)))
    res = blk.downsample(xb) if blk.downsample is not None else xb
    return blk.act(blk.mx_sum(out, res))


def _residual_unit(blk, x):
    xa, xb = blk.mx_branch_a(x), blk.mx_branch_b(x)
    return blk.mx_sum(blk.conv(xa), blk.residual(xb))


def _segresnet_block(blk, x):
    xa, xb = blk.mx_branch_a(x), blk.mx_branch_b(x)
    y = blk.conv2(blk.act(blk.norm2(blk.conv1(blk.act(blk.norm1(xa))))))
    return blk.mx_sum(y, xb)     # the block's `x += identity`, as a module


def _skip_connection(blk, x):
    xa, xb = blk.mx_branch_a(x), blk.mx_branch_b(x)
    y = blk.submodule(xb)
    return torch.cat([xa, y], dim=blk.dim) if blk.mode == "cat" else blk.mx_sum(xa, y)


def _canonical_forward(m: nn.Module):
    """The canonized forward for a block medexplain knows (the same function of ``x``, written with
    :class:`ResidualSum` and :class:`BranchPoint` modules), or None."""
    from monai.networks.blocks import ResidualUnit
    from monai.networks.blocks.segresnet_block import ResBlock
    from monai.networks.layers.simplelayers import SkipConnection
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
    if type(m) in (ResNetBlock, ResNetBottleneck):
        return _resnet_block
    if type(m) is ResBlock:
        return _segresnet_block
    if type(m) is ResidualUnit:
        return _residual_unit
    if type(m) is SkipConnection and m.mode in ("cat", "add"):
        return _skip_connection
    return None


@contextlib.contextmanager
def residual_canonizer(model: nn.Module):
    """Rewrite the residual blocks of ``model`` for LRP inside the ``with`` (see the module docstring):
    each known block gets ``mx_sum`` / ``mx_branch_a`` / ``mx_branch_b`` child modules and a forward that
    uses them; on exit, also after an error, the children are removed and the class forward is back.
    Yields the blocks rewritten (Zennit's ``Canonizer.apply`` / ``remove``, without Zennit)."""
    missing = object()
    patched = []
    try:
        for m in list(model.modules()):
            fn = _canonical_forward(m)
            if fn is None:
                continue
            patched.append((m, m.__dict__.get("forward", missing)))
            m._modules.update(mx_sum=ResidualSum(), mx_branch_a=BranchPoint(), mx_branch_b=BranchPoint())
            m.forward = fn.__get__(m)
        yield [m for m, _ in patched]
    finally:
        for m, fwd in patched:
            for name in ("mx_sum", "mx_branch_a", "mx_branch_b"):
                m._modules.pop(name, None)
            if fwd is missing:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd


_ADDITIONS = {torch.add, torch.sub, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.sub, torch.Tensor.sub_,
              torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__, torch.Tensor.__sub__,
              torch.Tensor.__rsub__, torch.Tensor.__isub__}


#: The probe of each network (:func:`_probe`), per call structure: ``{key: (additions, leaf indices to copy)}``.
_PROBES = weakref.WeakKeyDictionary()


def _structure(model: nn.Module, x: torch.Tensor) -> tuple:
    """What the probe's answer depends on besides the input's values: the row's shape, dtype and device, and
    every module's type, train/eval mode and forward (an instance's own forward, e.g. a canonized block's, by
    its function)."""
    mods = list(model.modules())
    return (tuple(x.shape[1:]), x.dtype, str(x.device),
            tuple((type(m), m.training, getattr(f, "__func__", f))
                  for m, f in zip(mods, (m.__dict__.get("forward") for m in mods))))


def _autograd_consumers(roots) -> dict:
    """``{(node, output_nr): n}``: how many edges of the backward graph reachable from any of ``roots`` read each
    output of each node (a leaf that requires grad is read through its ``AccumulateGrad`` node): the number of
    consumers whose gradient is summed into that tensor's."""
    counts: dict = {}
    stack = list({t.grad_fn for t in roots if t.grad_fn is not None})
    seen = set(stack)
    while stack:
        fn = stack.pop()
        for nxt, nr in fn.next_functions:
            if nxt is None:
                continue
            counts[(nxt, nr)] = counts.get((nxt, nr), 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def _probe(model: nn.Module, x: torch.Tensor, cost) -> tuple[int, frozenset]:
    """One probe forward of ``x[:1]``: ``(additions, copies)``, cached per network and :func:`_structure`
    (the forward's graph is taken not to depend on the input's values).

    ``additions``: how many additions (or subtractions) of two tensors derived from the input the forward
    makes outside any module LRP has a rule for: a residual connection no canonizer covers. Counted by a torch
    function mode (no hooks); a layer's own bias is added inside its kernel, and a parameter is not derived
    from the input (the model guard freezes them), so neither is counted.

    ``copies``: the indices (in :func:`_leaf_layers` order) of the layers whose input must be handed to them
    as their own copy (:func:`_own_inputs`): Captum's rules multiply a tensor's gradient by that tensor in a
    hook, which is the layer's relevance only when the layer is the tensor's one consumer in the backward
    graph. A layer whose every tensor input has one consumer (:func:`_autograd_consumers`; a plain chain of
    layers) reads it as it is, and is spared a copy per forward."""
    from torch.overrides import TorchFunctionMode

    from medexplain.engine.core import forward, network_cache

    x1 = x[:1]
    key = _structure(model, x1)
    cache = network_cache(_PROBES, model)
    if key in cache:
        return cache[key]

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in _ADDITIONS and len(args) >= 2 and all(
                    isinstance(a, torch.Tensor) and a.requires_grad and not isinstance(a, nn.Parameter)
                    for a in args[:2]):  # both derived from the input
                Count.n += 1
            return func(*args, **(kwargs or {}))

    leaves = _leaf_layers(model)
    seen: dict[int, list] = {i: [] for i in range(len(leaves))}

    def record(i):
        def hook(_m, args):   # each tensor input's node as the layer reads it (before any later in-place op)
            seen[i].append([(a, a.grad_fn, a.output_nr) for a in args if isinstance(a, torch.Tensor)])
        return hook

    outputs: list = []   # every layer's output is a root too: a layer whose output the score never reads (a deep
    # supervision head in eval) still reads its input, and Captum's hook on that input would be its own
    handles = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(leaves)]
    handles += [m.register_forward_hook(lambda _m, _a, o: outputs.append(o)) for m in leaves]
    try:
        with torch.enable_grad(), Count():
            out = forward(model, x1.detach().clone().requires_grad_(True), cost)
    finally:
        for h in handles:
            h.remove()
    counts = _autograd_consumers([t for t in [out, *outputs] if isinstance(t, torch.Tensor)])
    accumulate = {id(n.variable): n for n, _ in counts if hasattr(n, "variable")}   # leaves' AccumulateGrad nodes

    def consumers(a, node, nr):
        if node is None:
            return counts.get((accumulate.get(id(a)), 0), 0) if a.requires_grad else 0
        return counts.get((node, nr), 0)

    copies = frozenset(i for i, calls in seen.items()
                       if len(calls) != 1 or any(consumers(*t) != 1 for t in calls[0]))
    cache[key] = (Count.n, copies)
    return cache[key]


def _lrp_class():
    """Captum's ``LRP`` listing each layer once: a module registered under two parents (MONAI's ``DynUNet``
    keeps its encoder blocks in ``skip_layers`` too; a shared activation module) is collected twice by
    ``LRP._get_layers``, and Captum then hooks it twice and refuses it as "used more than once"."""
    from captum.attr import LRP

    class OnceLRP(LRP):
        def _get_layers(self, model):
            super()._get_layers(model)
            seen: set = set()
            self.layers = [m for m in self.layers if not (id(m) in seen or seen.add(id(m)))]

    return OnceLRP


def _own_inputs(module, args):
    """A forward pre-hook: the layer reads copies of its tensor inputs (see :func:`lrp`)."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _hooks_inputs(rule) -> bool:
    """Whether the rule puts a backward hook on its layer's input tensor (Captum's rules and the modified
    rules do; the pass-through and transparent rules, ``tensor_hooks = False``, do not)."""
    return getattr(rule, "tensor_hooks", True)


def _leaf_layers(module: nn.Module) -> list[nn.Module]:
    """Leaf modules in Captum's order (children, recursively), as ``LRP._get_layers`` collects them."""
    out = []
    for child in module.children():
        if len(list(child.children())) == 0:
            out.append(child)
        else:
            out.extend(_leaf_layers(child))
    return out


def _user_rule(m: nn.Module):
    """The rule a user set on ``m`` (``None``: none; a ``rule = None`` left on a layer by a Captum ``LRP`` call
    that raised before cleaning up counts as none)."""
    return getattr(m, "rule", None)


def _unsupported(layers) -> list[str]:
    return sorted({type(m).__name__ for m in layers
                   if _user_rule(m) is None
                   and not isinstance(m, _WEIGHTED + NORM + _NORM_LIKE + _SAME_TENSOR + _ELEMENTWISE + _CAPTUM_PASS
                                      + (ResidualSum,))})


def _lrp_applies(model, output) -> str | None:
    """The registry's reason (a phrase after "it"), or None."""
    bad = _unsupported(_leaf_layers(model))
    return f"has layer type(s) {bad} that no LRP rule covers (set a Captum rule on them: layer.rule = ...)" if bad \
        else None


def lrp_rules(model: nn.Module, composite: str = "epsilon", epsilon: float | None = None, gamma: float = 0.25,
              low=None, high=None) -> dict[nn.Module, object]:
    """The rule each leaf layer of ``model`` gets under ``composite`` (layers Captum handles by itself and
    layers with a user-set ``rule`` are left out)."""
    from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
    if composite not in COMPOSITES:
        raise InputError(f"unknown LRP composite {composite!r}; choose one of {COMPOSITES}")
    AlphaBetaRule, FlatRule, ZBoxRule, PassRule, TransparentRule = _make_rule_classes()
    layers = _leaf_layers(model)
    bad = _unsupported(layers)
    if bad:
        raise UnsupportedModelError(f"LRP has no rule for layer type(s) {bad}; set a Captum rule on them (layer.rule = ...)")
    eps = (1e-9 if composite == "epsilon" else 1e-6) if epsilon is None else float(epsilon)
    first = next((m for m in layers if isinstance(m, _WEIGHTED) and _user_rule(m) is None), None)
    rules = {}
    for m in layers:
        if _user_rule(m) is not None or isinstance(m, _CAPTUM_PASS):
            continue
        if isinstance(m, _SAME_TENSOR):
            rules[m] = TransparentRule()
        elif isinstance(m, _ELEMENTWISE):
            rules[m] = PassRule()
        elif isinstance(m, NORM):  # Captum's default for BatchNorm2d in "epsilon"; else pass (no canonizer)
            batch = isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            rules[m] = EpsilonRule() if composite == "epsilon" and batch else PassRule()
        elif isinstance(m, _NORM_LIKE + (ResidualSum,)):  # Zennit's Norm rule on pooling and Sum
            rules[m] = EpsilonRule()
        elif composite == "epsilon" or isinstance(m, nn.Linear) and m is not first:
            rules[m] = EpsilonRule(epsilon=eps)
        elif composite == "epsilon_plus_flat":
            rules[m] = FlatRule() if m is first else AlphaBetaRule(1.0, 0.0)
        elif composite == "epsilon_gamma_box":
            if m is first and isinstance(m, CONV + CONV_TRANSPOSE):
                rules[m] = ZBoxRule(low, high)
            else:
                rules[m] = GammaRule(gamma=gamma) if not isinstance(m, nn.Linear) else EpsilonRule(epsilon=eps)
        else:  # epsilon_alpha2_beta1
            rules[m] = AlphaBetaRule(2.0, 1.0) if not isinstance(m, nn.Linear) else EpsilonRule(epsilon=eps)
    return rules


@register("lrp", needs_hooks=True, applies_to=_lrp_applies, family="propagation",
          no_amp="its rules re-run each layer in the model's own precision, and its conservation (the relevance "
                 "sums to the score) would hold only to half precision")
def lrp(model, x, target, cost, composite: str = "epsilon_plus_flat", epsilon: float | None = None, gamma: float = 0.25,
        low=None, high=None, chunk_size: int | None = 64):
    """LRP with a standard composite (see the module docstring), N-D (Conv1d/2d/3d, ConvTranspose, Linear,
    pooling and norm layers of every dimensionality), on Captum's ``LRP``.

    The default composite is ``epsilon_plus_flat``, Zennit's recommendation for convolutional networks
    (Montavon et al. 2019, section 10.2): on biased, trained networks plain LRP-epsilon (Captum's default,
    ``composite="epsilon"``) is far from conserving relevance and reduces to input x gradient on
    piecewise-linear ones (``docs/peers.md`` measures both on the zoo models).

    The explained score is the target's (a class logit, or a segmenter's logits summed over a ``Region``);
    for a sum of outputs each output is seeded with its own relevance (``TargetScore(relevance_seed=True)``),
    so relevance is conserved per output. ``low``/``high``: the input box of ``epsilon_gamma_box`` (scalars or
    tensors broadcastable to ``x``; default each sample's min and max). ``chunk_size`` samples per call.
    A layer that runs twice in one forward (a shared module) is refused, as Captum refuses it. MONAI's residual
    blocks are canonized for the call (:func:`residual_canonizer`); other additions of input-derived tensors
    in the forward are counted on one probe row and warned about. ``info``: ``composite``,
    ``canonized_blocks``, ``uncanonized_additions``.
    """
    if composite not in COMPOSITES:
        raise InputError(f"unknown LRP composite {composite!r}; choose one of {COMPOSITES}")
    b = x.shape[0]
    lo = x.flatten(1).amin(1).view(-1, *[1] * (x.ndim - 1)) if low is None else torch.as_tensor(low).to(x)
    hi = x.flatten(1).amax(1).view(-1, *[1] * (x.ndim - 1)) if high is None else torch.as_tensor(high).to(x)

    def box(t, sl):
        return t[sl] if t.ndim == x.ndim and t.shape[0] == b > 1 else t

    def call(obj, xs, idx, sl):
        rules = lrp_rules(model, composite, epsilon, gamma, box(lo, sl), box(hi, sl))
        for m in _leaf_layers(model):  # Captum would read a leftover `rule = None` as a rule (put back on exit)
            if "rule" in m.__dict__ and m.rule is None:
                del m.rule
        for m, rule in rules.items():
            m.rule = rule
        # each consumer of a tensor gets its own copy, so every rule's input hook sits on a tensor only its layer
        # reads and relevance from several consumers (a skip connection: a pooling and a concatenation) adds up
        handles = [m.register_forward_pre_hook(getattr(rule, "pre_hook", _own_inputs)) for m, rule in rules.items()
                   if hasattr(rule, "pre_hook") or _hooks_inputs(rule) and id(m) in copied]
        try:
            return obj.attribute(xs, additional_forward_args=(idx,))
        except RuntimeError as e:
            if "more than once" in str(e):
                raise UnsupportedModelError("LRP: a layer with weights runs more than once in one forward pass (a "
                                            "shared module); LRP needs one rule application per such layer") from e
            raise
        finally:
            for h in handles:
                h.remove()

    with residual_canonizer(model) as blocks:
        n_add, copies = _probe(model, x, cost)
        copied = {id(m) for i, m in enumerate(_leaf_layers(model)) if i in copies}
        if n_add:
            warnings.warn(f"LRP: the model's forward adds {n_add} pair(s) of computed tensors outside any module "
                          "(residual connections no canonizer covers; medexplain canonizes MONAI's ResNetBlock, "
                          "ResNetBottleneck, ResidualUnit, SkipConnection and SegResNet's ResBlock). Relevance is "
                          "counted through both summands there, so the map is not conserved and can be orders of "
                          "magnitude too large.",
                          stacklevel=2)
        # every rule (Captum's and ours) assigns new weight storage (``weight.data = ...``) rather than writing
        # into it, and the guard puts the storage back: no copy of the weights' values is needed
        m = captum_call(model, x, target, cost, _lrp_class(), call, 1, chunk_size, relevance_seed=True)
    return m, {"composite": composite, "canonized_blocks": len(blocks), "uncanonized_additions": n_add}
