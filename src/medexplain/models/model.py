"""The one model object, ``mx.Model``, and the one loader, ``mx.load_model``.

A :class:`Model` is everything that decides what a prediction is (``docs/design.md``, "The model object"):

- the **network or networks**: one ``nn.Module``, or several (an ensemble: the mean of their scores, as
  nnU-Net's folds and most challenge winners predict);
- **test-time flips** over any set of spatial axes (``flip_axes``): the mean over the plain pass and the
  passes flipped over every non-empty subset of the axes (nnU-Net's mirroring: ``2^n`` passes);
- the **output adapter** (``output=``, :func:`medexplain.engine.core.select_output`), and **logits by default**
  where a network ends in a ``Softmax``/``Sigmoid`` module (the score is taken at that module's input;
  ``probabilities=True`` keeps the probabilities);
- the **inferer** (a MONAI ``SlidingWindowInferer``; the flips and the ensemble run per window, as nnU-Net
  runs them, and the gradient is exact window by window, :mod:`medexplain.engine.sliding`);
- the **output activation** (``activation``, how probabilities are read, :func:`medexplain.engine.ops.probabilities`)
  and the **preprocessing** with its inverse (:class:`medexplain.models.transforms.Preprocessing`, or nnU-Net's,
  or a bundle's), carried for the pipelines;
- ``device``, ``dtype`` and the **train/eval policy** ``eval`` (:func:`medexplain.engine.core.model_guard`).

The members x flips are one :class:`medexplain.engine.core.Passes` module, so every method differentiates the mean
over the passes exactly, ``info`` counts every pass, and CAMs record their layer once per pass and flip each
pass's cells back before combining them (``docs/cam.md``). A ``Model`` is an ``nn.Module`` whose forward is the
prediction, so code that takes a network takes a ``Model`` too; layer names stay the user's (those of the
first network; the same name is the same layer in every member of an ensemble).

:func:`load_model` builds a ``Model`` from every source medexplain knows: an ``nn.Module``, a TorchScript
file, ``package.module:factory`` (+ weights), ``zoo:<task>``, a folder written by ``medexplain train``, a
MONAI bundle folder, an nnU-Net v2 trained-model folder, or a list of these (an ensemble). The loaders of
:mod:`medexplain.models` are the ways of building one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medexplain.engine.core import (
    EVAL_POLICIES,
    OutputAdapter,
    Passes,
    check_input,
    find_passes,
    is_scripted,
    n_passes,
    resolve_device,
)
from medexplain.errors import InputError, ModelLoadError, UnsupportedModelError

__all__ = ["Model", "load_model", "as_model", "resolve_device", "source_kind"]

_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float": torch.float32, "float64": torch.float64, "double": torch.float64}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").strip().lower()
    if key not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}")
    return _DTYPES[key]


class Model(OutputAdapter):
    """One model object (module docstring): ``Model(network_or_networks, output=, activation=,
    preprocessing=, inferer=, flip_axes=, device=, dtype=, eval=, probabilities=, aligned_calls=, amp=)``.

    - ``network``: an ``nn.Module`` or a list of them (an ensemble, mean of their outputs);
    - ``flip_axes``: spatial axes (0-based) for test-time flips (all non-empty subsets plus the plain pass);
    - ``output``: :func:`medexplain.engine.core.select_output`'s ``output`` for each network's output;
    - ``probabilities``: ``False`` (default) explains the logits of a network ending in Softmax/Sigmoid
      (the input of that module), ``True`` its probabilities;
    - ``inferer``: a ``SlidingWindowInferer`` or its settings as a dict (``roi_size``, ``overlap``, ...);
    - ``activation``: the output activation ``auto|softmax|sigmoid|none`` for reading probabilities;
    - ``preprocessing``: a :class:`medexplain.models.transforms.Preprocessing` (or nnU-Net's), carried for the
      pipelines (:meth:`prepare`);
    - ``device``: ``None`` (where the networks are), ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda[:N]"``:
      the networks are moved there (``nn.Module.to``, in place); inputs are moved there once per explanation
      and maps come back on the CPU;
    - ``dtype``: the networks' floating dtype (cast in place when given; inputs are cast to it);
    - ``eval``: ``"auto"`` | ``"always"`` | ``"never"`` (:func:`medexplain.engine.core.model_guard`);
    - ``aligned_calls``: a CAM layer called several times in one pass on same-shaped inputs by the user's
      own code is refused (:class:`~medexplain.errors.RepeatedLayerCallError`) unless this says the calls
      are aligned (e.g. a shared block on several aligned inputs), in which case their cells are summed;
    - ``amp``: mixed precision for the networks' forward (``torch.autocast``: float16 on CUDA, bfloat16 on the
      CPU); the output is cast back to the input's dtype, so targets, gradients' accumulation and maps stay in
      it. Which methods tolerate it: ``docs/devices.md``. Off by default; exactness tests run without it.
    """

    def __init__(self, network, *, output=None, activation: str = "auto", preprocessing=None, inferer=None,
                 flip_axes=None, device=None, dtype=None, eval: str = "auto", probabilities: bool = False,
                 aligned_calls: bool = False, amp: bool = False, source: dict | None = None, name: str | None = None,
                 origin=None):
        if isinstance(network, Model):
            raise UnsupportedModelError("network is already a medexplain Model; change its settings with "
                                        "model.replace(...)")
        nets = list(network) if isinstance(network, (list, tuple, nn.ModuleList)) else [network]
        for n in nets:
            if not isinstance(n, nn.Module):
                raise UnsupportedModelError(f"a network must be a torch.nn.Module, got {type(n).__name__} (build a Model "
                                            "from a path, an nnU-Net folder or a bundle with mx.load_model)")
        if eval not in EVAL_POLICIES:
            raise InputError(f"eval must be one of {EVAL_POLICIES}, got {eval!r}")
        from medexplain.engine.ops import ACTIVATIONS
        if activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        dev, dt = resolve_device(device), _dtype(dtype)
        if dt is not None:
            nets = [n if is_scripted(n) else n.to(dtype=dt) for n in nets]
        if dev is not None:
            nets = [n.to(dev) for n in nets]
        passes = Passes(nets, flip_axes, output, logits=not probabilities, aligned_calls=aligned_calls, amp=amp)
        from medexplain.engine.sliding import SlidingWindowModel, as_inferer
        inferer = as_inferer(inferer)
        runner = passes if inferer is None else SlidingWindowModel(passes, inferer)
        super().__init__(runner, None)
        self.inferer, self.activation, self.preprocessing = inferer, activation, preprocessing
        self.eval_policy, self.probabilities, self.aligned_calls = eval, bool(probabilities), bool(aligned_calls)
        self._dtype_given = dt
        self.source = dict(source or {})
        self.name = name or "+".join(dict.fromkeys(type(n).__name__ for n in nets))
        self.origin = origin
        self._settings = dict(output=output, activation=activation, preprocessing=preprocessing, inferer=inferer,
                              flip_axes=flip_axes, eval=eval, probabilities=probabilities,
                              aligned_calls=aligned_calls, amp=bool(amp), source=self.source, name=self.name,
                              origin=origin)

    # ------------------------------------------------------------------ what it is
    @property
    def passes(self) -> Passes:
        """The members x flips (:class:`medexplain.engine.core.Passes`) inside the runner (registered once, there)."""
        return find_passes(self.model)

    @property
    def runner(self) -> nn.Module:
        """The module the methods run: the passes, through the sliding window when there is an inferer."""
        return self.model

    @property
    def networks(self) -> list[nn.Module]:
        return list(self.passes.networks)

    @property
    def flip_axes(self) -> tuple[int, ...]:
        return self.passes.flip_axes

    @property
    def output_adapter(self):
        """The ``output=`` of each network's output (the Model's own ``output`` slot, as an
        :class:`~medexplain.engine.core.OutputAdapter`, is None: its passes adapt the output)."""
        return self.passes.output

    @property
    def n_passes(self) -> int:
        """Network passes per input row: ensemble members x test-time flips."""
        return n_passes(self.passes)

    @property
    def device(self) -> torch.device:
        return _device(self.passes)

    @property
    def dtype(self) -> torch.dtype | None:
        p = next((p for p in self.passes.parameters() if torch.is_floating_point(p)), None)
        return p.dtype if p is not None else self._dtype_given

    @property
    def postprocessing(self):
        """The postprocessing of the bundle the Model was built from (:meth:`medexplain.models.bundle.Bundle.postprocess`:
        ``(prediction (K, *s'), prepared) -> prediction on the image grid``), or None. It takes what the network
        outputs (probabilities where it ends in Softmax/Sigmoid): :meth:`network_output`."""
        post = getattr(self.origin, "postprocess", None)
        return post if post is not None and self.origin.postprocessing() is not None else None

    @torch.no_grad()
    def network_output(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """What the networks themselves output for ``x`` (the mean over passes, on the CPU): ``out`` (the
        explained prediction, :meth:`predict`'s) when that is it, else the prediction with ``probabilities=True``
        (a network ending in Softmax/Sigmoid: the Model explains the logits, its own postprocessing expects
        probabilities; the mean over passes and windows is of what each pass outputs, as the network's own
        inference averages it)."""
        if out is not None and (self.probabilities or self.passes.ended_in is None):
            return out
        return (self.replace(probabilities=True) if not self.probabilities else self).predict(x)

    def replace(self, **changes) -> "Model":
        """A Model of the same networks with some settings changed (``output=``, ``inferer=``, ...)."""
        unknown = set(changes) - set(self._settings) - {"device", "dtype"}
        if unknown:
            raise InputError(f"Model has no setting(s) {sorted(unknown)}; settings: {sorted(self._settings)}")
        return Model(self.networks, **{**self._settings, "dtype": self._dtype_given, **changes})

    def describe(self) -> dict:
        """The model's settings as JSON-able values (for ``info`` and records)."""
        from medexplain.engine.sliding import inferer_settings

        return {"networks": len(self.passes.networks), "flip_axes": list(self.flip_axes), "passes": self.n_passes,
                "eval": self.eval_policy, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "score": "probabilities" if self.probabilities else "logits",
                **({"amp": True} if self.passes.amp else {}),
                "inferer": inferer_settings(self.inferer) if self.inferer is not None else None, **self.source}

    # ------------------------------------------------------------------ using it
    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked (:func:`medexplain.engine.core.check_input`) and moved once to the model's device (and cast to
        its dtype when one was given)."""
        x = check_input(x)
        dev = self.device
        if x.device != dev or (self._dtype_given is not None and x.dtype != self._dtype_given):
            x = x.to(device=dev, dtype=self._dtype_given or x.dtype)
        return x

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The explained output for ``x`` (the mean over passes; logits unless ``probabilities``), on the CPU,
        with the model guarded (train/eval policy, buffers restored)."""
        from medexplain.engine.core import model_guard

        x = self.to_input(x)
        with model_guard(self, policy=self.eval_policy):
            return self(x).detach().cpu()

    def preprocessor(self):
        """The built preprocessing (:class:`medexplain.models.transforms.Preprocessor`: apply and invert); the
        identity without one."""
        from medexplain.models.transforms import Preprocessing

        return (self.preprocessing if self.preprocessing is not None else Preprocessing()).build()

    def prepare(self, image: torch.Tensor, affine):
        """The model's preprocessing of an image ``(C, *s)`` read by medexplain
        (:class:`medexplain.models.transforms.Prepared`: the model's input ``image`` and the record to invert)."""
        return self.preprocessor().apply(image, affine)

    def invert(self, amap: torch.Tensor, prepared, nearest: bool = False) -> torch.Tensor:
        """A map ``(C_or_1, *s')`` on the model's grid back onto the image's own grid (the preprocessing's
        inverse; ``nearest`` for label maps)."""
        return self.preprocessor().invert(amap, prepared, nearest)

    def info(self, notes: dict | None = None) -> dict:
        """What ``info`` says about the model after an explanation (``notes``: the model guard's)."""
        out = {"model": self.describe()}
        if self.passes.ended_in is not None and not self.probabilities:
            out["score"] = (f"logits: the network ends in {self.passes.ended_in}; the score is taken at its input "
                            "(probabilities=True explains the probabilities)")
        if notes and "eval" in notes:
            out["eval"] = notes["eval"]
        return out


def _device(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def as_model(model, output=None, inferer=None, **settings) -> Model:
    """A :class:`Model` for anything :func:`medexplain.engine.explain` takes: a Model as is (``output=`` / ``inferer=``
    given here replace its own), a :class:`~medexplain.models.spec.ModelSpec` loaded, an nnU-Net model or a MONAI
    bundle (:func:`load_model`), a sliding-window model (its network and inferer), or an ``nn.Module`` wrapped in
    one."""
    from medexplain.engine.sliding import SlidingWindowModel

    if _is_spec(model):
        return as_model(model.load(), output, inferer, **settings)

    if isinstance(model, Model):
        changes = {k: v for k, v in (("output", output), ("inferer", inferer)) if v is not None}
        changes.update(settings)
        return model.replace(**changes) if changes else model
    if _is_loaded(model):
        return load_model(model, output=output, inferer=inferer, **settings)
    if isinstance(model, SlidingWindowModel):
        return Model(model.model, output=output, inferer=inferer or model.inferer, **settings)
    return Model(model, output=output, inferer=inferer, **settings)


def _is_spec(obj) -> bool:
    """A :class:`medexplain.models.spec.ModelSpec` (which loads itself through :func:`load_model`; by name, as the
    spec module imports this one)."""
    return type(obj).__name__ == "ModelSpec" and type(obj).__module__ == "medexplain.models.spec"


def _is_loaded(obj) -> bool:
    name = type(obj).__name__
    return name in ("NnUNetModel", "Bundle") and type(obj).__module__.startswith("medexplain.models")


def load_model(source, weights: str | None = None, *, flip_axes=None, output=None, activation: str = "auto",
               preprocessing=None, inferer=None, device=None, dtype=None, eval: str = "auto",
               probabilities: bool = False, aligned_calls: bool = False, amp: bool = False,
               map_location: str = "cpu", **loader_options) -> Model:
    """The one loader: a :class:`Model` from every source medexplain knows.

    ``source``:

    - an ``nn.Module`` (wrapped);
    - ``"zoo:<task>"``, a TorchScript file, ``"package.module:factory"`` (+ ``weights``), a folder written by
      ``medexplain train`` (:func:`medexplain.models.loading.load_model`);
    - a MONAI bundle folder (``configs/inference.json``) or a loaded :class:`~medexplain.models.bundle.Bundle`:
      its network, preprocessing and sliding-window inferer (:func:`medexplain.models.bundle.load_bundle`);
    - an nnU-Net v2 trained-model folder (``plans.json`` + ``fold_K``) or a loaded
      :class:`~medexplain.models.nnunet.NnUNetModel`: its folds as the ensemble, its mirroring axes as the
      flips (unless ``use_mirroring=False``), its sliding window and preprocessing
      (:func:`medexplain.models.nnunet.load_nnunet`; ``loader_options``: ``folds``, ``configuration``,
      ``use_mirroring``, ``tile_step_size``, ...);
    - a list of any of these: an ensemble (the first source's preprocessing and inferer; ``weights`` then is a
      list with one entry, or None, per member);
    - a :class:`~medexplain.models.spec.ModelSpec` (checked first, :meth:`~medexplain.models.spec.ModelSpec.check`;
      its fields are the settings, so none may be given here too).

    Settings given here (``flip_axes``, ``inferer``, ``preprocessing``, ...) override the source's own.
    Every problem is a typed error (:class:`~medexplain.errors.ModelLoadError`) before any work.
    """
    if _is_spec(source):
        given = dict(weights=weights, flip_axes=flip_axes, output=output, preprocessing=preprocessing,
                     inferer=inferer, device=device, dtype=dtype, **loader_options)
        if any(v is not None for v in given.values()) or activation != "auto" or eval != "auto" or probabilities \
                or amp:
            raise ModelLoadError("a ModelSpec holds the model's settings: change them with spec.replace(...), not "
                                 "as arguments of load_model")
        return source.load(aligned_calls=aligned_calls, map_location=map_location)
    settings = dict(output=output, activation=activation, device=device, dtype=dtype, eval=eval,
                    probabilities=probabilities, aligned_calls=aligned_calls, amp=amp)
    if isinstance(source, Model):
        return source.replace(**{k: v for k, v in dict(flip_axes=flip_axes, inferer=inferer,
                                                         preprocessing=preprocessing, **settings).items()
                                 if v is not None and not (k in ("activation", "eval") and v == "auto")
                                 and not (k in ("probabilities", "aligned_calls", "amp") and v is False)})
    if isinstance(source, (list, tuple)):
        if not source:
            raise ModelLoadError("an ensemble needs at least one model")
        ws = list(weights) if isinstance(weights, (list, tuple)) else [None] * len(source) if weights is None else None
        if ws is None or len(ws) != len(source):
            raise ModelLoadError(f"an ensemble of {len(source)} models takes weights= as a list, one entry (or None) "
                                 "per member")
        parts = [load_model(s, w, map_location=map_location, **loader_options) for s, w in zip(source, ws)]
        first = parts[0]
        return Model([n for p in parts for n in p.networks], flip_axes=flip_axes if flip_axes is not None else
                     first.flip_axes or None, inferer=inferer if inferer is not None else first.inferer,
                     preprocessing=preprocessing if preprocessing is not None else first.preprocessing,
                     source={"ensemble": [p.source for p in parts]}, name="+".join(p.name for p in parts),
                     **settings)
    built = _build(source, weights, map_location, dtype, loader_options)
    nets, src_flips, src_inferer, src_prep, described, origin = built
    return Model(nets, flip_axes=flip_axes if flip_axes is not None else src_flips,
                 inferer=inferer if inferer is not None else src_inferer,
                 preprocessing=preprocessing if preprocessing is not None else src_prep, source=described,
                 name=_source_name(source), origin=origin, **settings)


def _source_name(source) -> str:
    """A short name of one source: its text, a module's or loaded model's type."""
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def _build(source, weights, map_location, dtype, loader_options):
    """``(networks, flip_axes, inferer, preprocessing, description, origin)`` of one source (``origin``: the
    loaded nnU-Net model or bundle, None otherwise)."""
    if isinstance(source, nn.Module):
        if weights:
            raise ModelLoadError("weights= is for a package.module:factory source; load them into the module yourself")
        _no_options(loader_options, "an nn.Module")
        return [source], None, None, None, {"source": type(source).__name__}, None
    name = type(source).__name__
    kind = source_kind(source)
    if kind == "nnunet":
        from medexplain.models.nnunet import NnUNetModel, load_nnunet

        nnm = source if isinstance(source, NnUNetModel) else \
            load_nnunet(source, **({"dtype": _dtype(dtype)} if dtype is not None else {}), **loader_options)
        return (list(nnm.networks), nnm._axes(), nnm.inferer, nnm.preprocessing,
                {"source": "nnunet", "nnunet": nnm.describe()}, nnm)
    if kind == "bundle":
        from medexplain.models.bundle import Bundle, load_bundle

        b = source if isinstance(source, Bundle) else load_bundle(source, weights=weights, map_location=map_location,
                                                                   **loader_options)
        return [b.network], None, b.inferer, b.model_preprocessing(), {"source": "bundle", "bundle": str(b.root)}, b
    if isinstance(source, (str, Path)):
        from medexplain.models.loading import load_model as load_spec

        _no_options(loader_options, str(source))
        net = load_spec(str(source), weights, map_location=map_location)
        return [net], None, None, None, {"source": str(source), **({"weights": str(weights)} if weights else {})}, None
    raise ModelLoadError(f"cannot build a model from a {name}: give an nn.Module, a path, 'package.module:factory', "
                         "'zoo:<task>', a MONAI bundle or an nnU-Net folder")


def source_kind(source) -> str | None:
    """``"nnunet"`` for an nnU-Net v2 folder (``plans.json``) or a loaded ``NnUNetModel``, ``"bundle"`` for a MONAI
    bundle folder (``configs/inference.json``, ...) or a loaded ``Bundle``, None for every other source: the one
    rule :func:`load_model` and the pipelines (which name an nnU-Net case's outputs by its case, and check a
    bundle's prediction file before loading) tell the sources apart by."""
    from medexplain.models.bundle import CONFIG_NAMES

    name = type(source).__name__
    if isinstance(source, Model):
        name = type(source.origin).__name__
    if name == "NnUNetModel" or (isinstance(source, (str, Path)) and (Path(source) / "plans.json").is_file()):
        return "nnunet"
    if name == "Bundle" or (isinstance(source, (str, Path)) and Path(source).is_dir()
                            and any((Path(source) / c).is_file() for c in CONFIG_NAMES)):
        return "bundle"
    return None


def _no_options(options: dict, what: str) -> None:
    if options:
        raise ModelLoadError(f"option(s) {sorted(options)} are for nnU-Net folders and MONAI bundles, not {what}")
