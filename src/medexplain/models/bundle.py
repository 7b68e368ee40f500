"""MONAI bundles: the network, weights, preprocessing, inferer and postprocessing of a bundle folder.

A MONAI bundle (the format of the MONAI Model Zoo, https://github.com/Project-MONAI/model-zoo) is a folder
with ``configs/inference.json`` (or ``.yaml``) and ``models/model.pt``. Its config is read with MONAI's own
``monai.bundle.ConfigParser``, so every ``_target_``, ``@reference`` and ``$expression`` of the config
means what it means to MONAI:

- ``network_def``: the network, instantiated by the parser; ``models/model.pt``: its state dict (a plain
  state dict, or a dict holding it under ``model`` / ``state_dict`` / ``network``), loaded strictly; a
  bundle with only ``models/model.ts`` gives its TorchScript module;
- ``preprocessing``: the ``Compose`` of dictionary transforms the bundle applies to ``{"image": path}``;
- ``inferer``: a ``SlidingWindowInferer`` is used as the explanation's inferer (:mod:`medexplain.engine.sliding`,
  the window-by-window gradient); a ``SimpleInferer`` (or none) runs the network on the whole input;
- ``postprocessing``: the bundle's own output transforms (activation, ``Invertd`` back to the image,
  discretisation), run by :meth:`Bundle.postprocess` on the prediction with the writer transforms
  (``SaveImage``/``SaveImaged``) left out, so nothing is written behind the caller's back.

How an image goes through it. medexplain reads the file itself (:func:`medexplain.io.read_image`: voxels in
nibabel's order, channels first, the file's affine), which is what the bundle's ``LoadImaged`` +
``EnsureChannelFirstd`` produce for a NIfTI file; those two loader transforms are therefore dropped and the
remaining transforms (orientation, spacing, intensity, crop/pad, ...) are run, as the same transform
instances, by :class:`medexplain.models.transforms.Preprocessing` (``transform=``). Its inversion (MONAI's
``Compose.inverse`` over the recorded operations, the mechanism of ``Invertd``) puts every map back on the
input's own grid and affine. Nothing of the bundle format is re-implemented here; this module only maps
the bundle's parts onto medexplain's model, preprocessing and inferer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medexplain.errors import ModelLoadError, UnsupportedModelError

__all__ = ["Bundle", "load_bundle", "CONFIG_NAMES"]

#: Where a bundle keeps its inference config, in the order looked for.
CONFIG_NAMES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
#: Transforms that read files or add the channel axis: medexplain's reader does both.
LOADERS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "AddChannel", "AddChanneld")
#: Transforms that write files: never run by medexplain.
WRITERS = ("SaveImage", "SaveImaged")


@dataclass
class Bundle:
    """A loaded MONAI bundle (see the module docstring): ``network`` (eval mode, weights loaded),
    ``preprocessing`` (the bundle's ``Compose``, or None), ``inferer`` (a ``SlidingWindowInferer`` or None),
    the ``parser`` (``monai.bundle.ConfigParser``) and the paths it came from."""

    root: Path
    config: Path
    network: nn.Module
    weights: Path | None
    preprocessing: object = None
    inferer: object = None
    parser: object = None
    dropped: list = field(default_factory=list)

    def image_key(self) -> str:
        return "image"

    def model_preprocessing(self):
        """The bundle's preprocessing without its loader transforms (module docstring), as a
        :class:`medexplain.models.transforms.Preprocessing` (empty when the bundle has none)."""
        from monai.transforms import Compose

        from medexplain.models.transforms import Preprocessing

        if self.preprocessing is None:
            return Preprocessing()
        kept = [t for t in _flat(self.preprocessing) if type(t).__name__ not in LOADERS]
        return Preprocessing(transform=Compose(kept)) if kept else Preprocessing()

    def postprocessing(self):
        """The bundle's ``postprocessing`` ``Compose`` without writer transforms, or None when the config
        has none (parsed on first use: it may reference parts of the config only inference needs)."""
        from monai.transforms import Compose

        if self.parser is None or "postprocessing" not in self.parser.config:
            return None
        try:
            post = self.parser.get_parsed_content("postprocessing")
        except Exception as e:
            raise ModelLoadError(f"{self.config}: cannot build 'postprocessing': {type(e).__name__}: {e}") from e
        return Compose([t for t in _flat(post) if type(t).__name__ not in WRITERS])

    def postprocess(self, pred: torch.Tensor, prepared) -> torch.Tensor:
        """The bundle's postprocessing of a prediction ``(K, *s')`` on the model grid, with the preprocessed
        image's record (``prepared``: :class:`medexplain.models.transforms.Prepared`) under ``"image"`` so that its
        ``Invertd`` finds it; returns ``data["pred"]`` as a plain tensor (the prediction as it is without
        postprocessing when the bundle has none)."""
        from monai.data import MetaTensor

        post = self.postprocessing()
        if post is None:
            return pred
        meta = prepared.meta
        image = meta if meta is not None else MetaTensor(prepared.image, affine=torch.as_tensor(prepared.affine))
        p = MetaTensor(pred.detach().float().cpu(), affine=image.affine.clone(),
                       applied_operations=list(getattr(image, "applied_operations", [])))
        try:
            data = post({"pred": p, "image": image})
        except Exception as e:
            raise ModelLoadError(f"{self.config}: the bundle's postprocessing failed: {type(e).__name__}: {e}") from e
        out = data["pred"] if isinstance(data, dict) else data
        return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)

    def describe(self) -> dict:
        from medexplain.engine.sliding import inferer_settings

        return {"bundle": str(self.root), "config": str(self.config), "weights": str(self.weights) if self.weights else None,
                "network": type(self.network).__name__,
                "preprocessing": [type(t).__name__ for t in _flat(self.preprocessing)] if self.preprocessing else [],
                "inferer": inferer_settings(self.inferer) if self.inferer is not None else None}


def _flat(compose) -> list:
    """The transforms of a ``Compose`` (nested ones flattened), or ``[t]`` for a single transform."""
    return list(compose.flatten().transforms) if hasattr(compose, "flatten") else [compose]


def _state_dict(obj, path: Path) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict(obj[key], path)
    raise ModelLoadError(f"{path}: not a state dict (a dict of tensors, or one under 'model', 'state_dict' or "
                         f"'network'); got {type(obj).__name__}")


def _parsed(parser, key: str, config: Path):
    try:
        return parser.get_parsed_content(key)
    except Exception as e:
        raise ModelLoadError(f"{config}: cannot build {key!r}: {type(e).__name__}: {e}") from e


def load_bundle(root, config: str | None = None, weights: str | None = None, map_location: str = "cpu") -> Bundle:
    """Load the MONAI bundle in folder ``root`` (module docstring): ``configs/inference.json`` (or
    ``.yaml``; ``config`` names another file inside the bundle) and ``models/model.pt`` (``weights``
    another). The network comes back in eval mode on ``map_location``. Every failure (no config, a config
    MONAI cannot parse, weights that do not fit) is a :class:`~medexplain.errors.ModelLoadError`."""
    from monai.bundle import ConfigParser

    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"--bundle {root}: not a folder (a MONAI bundle is a folder with configs/inference.json "
                             "and models/model.pt)")
    names = [config] if config else CONFIG_NAMES
    cfg = next((root / n for n in names if (root / n).is_file()), None)
    if cfg is None:
        raise ModelLoadError(f"--bundle {root}: no {' or '.join(names)} found")
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg))
    except Exception as e:
        raise ModelLoadError(f"{cfg}: cannot read the bundle config: {type(e).__name__}: {e}") from e
    parser["bundle_root"] = str(root)  # the config's own paths resolve inside the bundle
    if "network_def" not in parser.config:
        raise ModelLoadError(f"{cfg}: no 'network_def' (the network to explain)")
    net = _parsed(parser, "network_def", cfg)
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"{cfg}: 'network_def' built a {type(net).__name__}, not a torch.nn.Module")
    wpath = root / (weights or "models/model.pt")
    if wpath.is_file():
        try:
            obj = torch.load(str(wpath), map_location=map_location, weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{wpath}: cannot read the weights: {type(e).__name__}: {e}") from e
        try:
            net.load_state_dict(_state_dict(obj, wpath))
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{wpath} does not fit the bundle's network_def: {e}") from e
    elif weights is None and (root / "models/model.ts").is_file():
        wpath = root / "models/model.ts"
        net = torch.jit.load(str(wpath), map_location=map_location)
    else:
        raise ModelLoadError(f"--bundle {root}: no weights at {wpath}")
    net = net.to(map_location).eval()
    pre = _parsed(parser, "preprocessing", cfg) if "preprocessing" in parser.config else None
    inferer = None
    if "inferer" in parser.config:
        from monai.inferers import SimpleInferer, SlidingWindowInferer

        inferer = _parsed(parser, "inferer", cfg)
        if isinstance(inferer, SimpleInferer):
            inferer = None
        elif not isinstance(inferer, SlidingWindowInferer):
            raise UnsupportedModelError(f"{cfg}: the bundle's inferer is a {type(inferer).__name__}; medexplain explains "
                                        "through a SlidingWindowInferer or a SimpleInferer")
    return Bundle(root, cfg, net, wpath, pre, inferer, parser)
