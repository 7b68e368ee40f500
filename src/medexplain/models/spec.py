"""``mx.ModelSpec``: a model described before it is loaded (``docs/design.md``, "The model object").

A :class:`ModelSpec` is what every pipeline, the command line and a run's workers pass around instead of the
loaded :class:`mx.Model <medexplain.models.model.Model>`: frozen, JSON-able (:meth:`ModelSpec.to_dict` /
:meth:`ModelSpec.from_dict`), cheap to pickle (a run sends it to each local worker process or Ray actor, which
loads it once, :meth:`ModelSpec.load`). It names the model's source and every setting of ``mx.Model``; a run
manifest's per-case columns are :meth:`ModelSpec.replace`.

This module imports no torch: :meth:`ModelSpec.check` (the contradictions between sources, raised as
:class:`~medexplain.errors.OptionError` before anything loads) runs while the command line parses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from medexplain.errors import OptionError

__all__ = ["ModelSpec"]


def _text(v):
    """A path given as ``Path`` as text (what JSON and a pickle to another machine keep)."""
    return str(v) if isinstance(v, Path) else v


def _seq(v):
    """A list of sources or weights as a tuple (frozen), a single one as it is."""
    if isinstance(v, (list, tuple)):
        return tuple(_text(s) for s in v)
    return _text(v)


def _prep_fields(prep) -> dict:
    """The preprocessing fields that are set, ``{}`` for none (a dict, or a
    :class:`~medexplain.models.transforms.Preprocessing`'s fields)."""
    if prep is None:
        return {}
    if isinstance(prep, dict):
        return {k: v for k, v in prep.items() if v not in (None, "")}
    if getattr(prep, "active", False) is False:
        return {}
    return {"preprocessing": prep}


@dataclass(frozen=True)
class ModelSpec:
    """A model before it is loaded: its source and the settings of :class:`medexplain.models.model.Model`.

    - ``source``: what :func:`medexplain.models.model.load_model` builds a Model from: a TorchScript file,
      ``"package.module:factory"`` (with ``weights``), ``"zoo:<task>"``, a ``medexplain train`` folder, a MONAI
      bundle folder, an nnU-Net v2 folder, an ``nn.Module``, or a list of these (an ensemble, the mean of their
      scores; ``weights`` then a list with one entry, or None, per member);
    - ``bundle`` / ``nnunet``: a MONAI bundle folder / an nnU-Net v2 trained-model folder given as such (the
      command line's ``--bundle`` / ``--nnunet``) instead of ``source``; ``nnunet_options``: its loader's
      options (``folds``, ``configuration``, ``use_mirroring``, ``trusted``, ``tile_step_size``, ...:
      :func:`medexplain.models.nnunet.load_nnunet`);
    - ``output``, ``activation``, ``probabilities``, ``flip_axes``, ``device``, ``dtype``, ``amp``, ``eval``:
      ``mx.Model``'s settings of the same names;
    - ``preprocessing``: the fields of :class:`~medexplain.models.transforms.Preprocessing` as a dict (the
      command line's and the manifest's text, e.g. ``{"spacing": "1,1,2"}``) or a ``Preprocessing``;
    - ``inferer``: the sliding-window settings as a dict (``roi_size``, ``overlap``, ``sw_batch_size``,
      ``mode``) or a ``SlidingWindowInferer``.

    A bundle and an nnU-Net folder bring their own preprocessing (and an nnU-Net folder its sliding window and
    mirroring): giving them again is a contradiction (:meth:`check`).
    """

    source: object = None
    weights: object = None
    bundle: object = None
    nnunet: object = None
    nnunet_options: dict | None = None
    output: object = None
    activation: str = "auto"
    probabilities: bool = False
    preprocessing: object = None
    inferer: object = None
    flip_axes: tuple | None = None
    device: str | None = None
    dtype: str | None = None
    amp: bool = False
    eval: str = "auto"

    def __post_init__(self):
        put = object.__setattr__
        put(self, "source", _seq(self.source))
        put(self, "weights", _seq(self.weights))
        put(self, "bundle", _text(self.bundle))
        put(self, "nnunet", _text(self.nnunet))
        if self.source == () or self.source == []:
            put(self, "source", None)
        if isinstance(self.weights, tuple) and not any(w is not None for w in self.weights):
            put(self, "weights", None)
        opts = {k: v for k, v in (self.nnunet_options or {}).items() if v is not None}
        put(self, "nnunet_options", opts or None)
        prep = self.preprocessing
        if isinstance(prep, dict):
            prep = {k: v for k, v in prep.items() if v not in (None, "")} or None
        put(self, "preprocessing", prep)
        inf = self.inferer
        if isinstance(inf, dict) and inf.get("roi_size") is None:
            inf = None   # the command line's settings without --roi-size: no sliding window
        put(self, "inferer", inf)
        if self.flip_axes is not None:
            try:
                axes = tuple(int(a) for a in self.flip_axes)
            except (TypeError, ValueError):
                raise OptionError(f"flip_axes must be spatial axis numbers, got {self.flip_axes!r}") from None
            put(self, "flip_axes", axes or None)
        if self.device is not None:
            put(self, "device", str(self.device))
        if self.dtype is not None:
            put(self, "dtype", str(self.dtype).replace("torch.", ""))
        put(self, "amp", bool(self.amp))
        put(self, "probabilities", bool(self.probabilities))

    # ------------------------------------------------------------------ checks, before anything loads
    def _is_nnunet_folder(self) -> bool:
        s = self.source
        return isinstance(s, (str, Path)) and (Path(s) / "plans.json").is_file()

    def check(self) -> "ModelSpec":
        """The contradictions between the sources and settings, each an :class:`~medexplain.errors.OptionError`
        naming the options to drop, without loading anything (and without importing torch). Returns ``self``."""
        if self.nnunet is not None and self.bundle is not None:
            raise OptionError("give one of --nnunet and --bundle")
        if self.flip_axes and (self.nnunet is not None or self.bundle is not None):
            raise OptionError("--flip-axes flips a --model; an nnU-Net folder's own flips are its mirroring "
                              "(--mirroring), a bundle's are its own")
        prep = bool(_prep_fields(self.preprocessing))
        if self.nnunet is not None:
            if self.source is not None or self.weights is not None or prep or self.inferer is not None:
                raise OptionError("--nnunet gives the model, its preprocessing and its sliding window: drop --model, "
                                  "--weights, --bundle, the preprocessing and the sliding-window options")
        elif self.bundle is not None:
            if self.source is not None or self.weights is not None or prep:
                raise OptionError("--bundle gives the model, its weights and its preprocessing: drop --model, --weights "
                                  "and the preprocessing options")
        elif self.source is None:
            raise OptionError("give the model to explain (--model), a MONAI bundle (--bundle) or an nnU-Net model "
                              "folder (--nnunet)")
        if self.nnunet_options and self.nnunet is None and not self._is_nnunet_folder():
            raise OptionError(f"nnunet_options {sorted(self.nnunet_options)} are for an nnU-Net model folder "
                              "(--nnunet)")
        if isinstance(self.source, tuple):
            if isinstance(self.weights, tuple) and len(self.weights) != len(self.source):
                raise OptionError(f"{len(self.weights)} --weights for {len(self.source)} --model: give one per model "
                                  "(in the order of --model), or none")
        elif isinstance(self.weights, tuple):
            if len(self.weights) != 1:
                raise OptionError(f"{len(self.weights)} --weights for one --model: give one")
        return self

    # ------------------------------------------------------------------ the model
    def load(self, aligned_calls: bool = False, map_location: str = "cpu"):
        """The :class:`~medexplain.models.model.Model`, after :meth:`check`: the source (``nnunet``: its loader
        :func:`medexplain.models.nnunet.as_nnunet` with ``nnunet_options``; ``bundle``:
        :func:`medexplain.models.bundle.load_bundle`; else ``source`` with ``weights``) built by
        :func:`medexplain.models.model.load_model` with the spec's settings, named :attr:`name`."""
        from medexplain.models.model import _dtype, load_model

        self.check()
        prep = self.preprocessing
        if isinstance(prep, dict):
            from medexplain.models.transforms import Preprocessing
            prep = Preprocessing(**prep)
        settings = dict(output=self.output, activation=self.activation, device=self.device, dtype=self.dtype,
                        eval=self.eval, probabilities=self.probabilities, amp=self.amp, aligned_calls=aligned_calls,
                        map_location=map_location)
        if self.nnunet is not None:
            from medexplain.models.nnunet import as_nnunet  # its loader's errors name --nnunet
            nnm = as_nnunet(self.nnunet, **({"dtype": _dtype(self.dtype)} if self.dtype else {}),
                            **(self.nnunet_options or {}))
            model = load_model(nnm, **settings)
        elif self.bundle is not None:
            from medexplain.models.bundle import Bundle, load_bundle  # its loader's errors name --bundle
            b = self.bundle if isinstance(self.bundle, Bundle) else load_bundle(self.bundle, map_location=map_location)
            model = load_model(b, inferer=self.inferer, **settings)
        else:
            source = list(self.source) if isinstance(self.source, tuple) else self.source
            weights = list(self.weights) if isinstance(self.weights, tuple) else self.weights
            model = load_model(source, weights, flip_axes=self.flip_axes, preprocessing=prep, inferer=self.inferer,
                               **settings, **(self.nnunet_options or {}))
        return model.replace(name=self.name)

    def replace(self, **fields) -> "ModelSpec":
        """The spec with some fields changed (a run manifest's per-case columns); an unknown field is an
        :class:`~medexplain.errors.OptionError`."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise OptionError(f"ModelSpec has no field(s) {sorted(unknown)}; fields: "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **fields)

    def members(self) -> list["ModelSpec"]:
        """One spec per member of the ensemble this spec loads: each source of a list (with its weights), each
        fold of an nnU-Net folder (``nnunet_options["folds"]``), or ``[self]``. Contrast Shapley's value per
        model (per fold) is computed on each."""
        if isinstance(self.source, tuple):
            ws = self.weights if isinstance(self.weights, tuple) else (None,) * len(self.source)
            return [self.replace(source=s, weights=w) for s, w in zip(self.source, ws)]
        folds = (self.nnunet_options or {}).get("folds")
        if (self.nnunet is not None or self._is_nnunet_folder()) and isinstance(folds, (list, tuple)) and len(folds) > 1:
            return [self.replace(nnunet_options={**self.nnunet_options, "folds": [f]}) for f in folds]
        return [self]

    def absolute(self) -> "ModelSpec":
        """The spec with every source, weights, bundle and nnU-Net path that exists made absolute (so that a
        resumed run started elsewhere and remote workers find them)."""
        def absolute(v):
            if isinstance(v, tuple):
                return tuple(absolute(s) for s in v)
            return str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v

        return dataclasses.replace(self, source=absolute(self.source), weights=absolute(self.weights),
                                   bundle=absolute(self.bundle), nnunet=absolute(self.nnunet))

    @property
    def sendable(self) -> bool:
        """Whether another process can load this spec itself: every source is text (a path, a factory, a zoo
        name), not an object built in this process."""
        srcs = self.source if isinstance(self.source, tuple) else (self.source,)
        return all(s is None or isinstance(s, str) for s in (*srcs, self.bundle, self.nnunet))

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """Every field as JSON values (:meth:`from_dict` reads it back into an equal spec). A source, bundle,
        nnU-Net model, preprocessing or inferer given as a Python object cannot be written: an
        :class:`~medexplain.errors.OptionError` (:meth:`describe` records it by its type)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not _jsonable(v):
                raise OptionError(f"ModelSpec.{f.name} is a {type(v).__name__}, which JSON cannot hold; give it as "
                                  "text (a path, package.module:factory, a dict of settings)")
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        """The spec :meth:`to_dict` wrote (unknown keys are an :class:`~medexplain.errors.OptionError`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise OptionError(f"ModelSpec has no field(s) {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> dict:
        """The fields that differ from their defaults, as JSON values (what a run records as its model; objects
        by their type name, a Preprocessing by its settings, a sliding window by its settings)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v == f.default:
                continue
            out[f.name] = _described(v)
        return out

    @property
    def name(self) -> str:
        """A short name of the model (what ``info.json`` records as ``model``): the source's text or type, the
        members joined by ``+``, the bundle or nnU-Net folder."""
        if self.nnunet is not None:
            return f"nnU-Net {Path(str(self.nnunet)).name}" if isinstance(self.nnunet, str) else type(self.nnunet).__name__
        if self.bundle is not None:
            return f"bundle {Path(str(self.bundle)).name}" if isinstance(self.bundle, str) else type(self.bundle).__name__
        srcs = self.source if isinstance(self.source, tuple) else (self.source,)
        return "+".join(s if isinstance(s, str) else getattr(s, "name", None) if isinstance(getattr(s, "name", None), str)
                        else type(s).__name__ for s in srcs)   # a loaded mx.Model keeps its own name


def _jsonable(v) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def _described(v):
    if _jsonable(v):
        return list(v) if isinstance(v, tuple) else v
    if isinstance(v, tuple):
        return [_described(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _described(x) for k, x in v.items()}
    if hasattr(v, "describe") and type(v).__name__ == "Preprocessing":
        return v.describe()
    if hasattr(v, "roi_size"):   # a SlidingWindowInferer
        from medexplain.engine.sliding import inferer_settings
        return inferer_settings(v)
    return type(v).__name__
