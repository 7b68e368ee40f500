"""nnU-Net v2 trained-model folders, explained as nnU-Net runs them (``docs/nnunet.md``).

An nnU-Net model is a trained-model folder (``nnUNet_results/DatasetXXX/Trainer__Plans__configuration``)
holding ``plans.json``, ``dataset.json`` and ``fold_K/checkpoint_final.pth``. Everything nnU-Net-specific
comes from ``nnunetv2`` itself (Isensee et al. 2021, "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nat. Methods 18:203):

- the network: ``PlansManager`` / ``ConfigurationManager`` read the plans and the trainer's
  ``build_network_architecture`` (for the default ``nnUNetTrainer``: ``get_network_from_plans``, the
  call that method makes) builds it with deep supervision off, so the output is the full-resolution
  head; weights from the checkpoint's ``network_weights``;
- the preprocessing: the configuration's preprocessor (``DefaultPreprocessor.run_case_npy``: transpose,
  crop to the non-zero region, per-channel normalisation scheme, resampling to the target spacing);
- the inverse for maps, as ``convert_predicted_logits_to_segmentation_with_correct_shape`` writes a
  segmentation: the configuration's ``resampling_fn_probabilities`` (``resampling_fn_seg`` for label
  maps) back to the cropped shape, ``insert_crop_into_image`` into the uncropped grid, ``transpose_backward``;
- the sliding window: window positions from nnU-Net's ``_internal_get_sliding_window_slicers`` (called
  with this model's patch size and step) and its Gaussian from ``compute_gaussian(patch, 1/8, 10)`` (in float16,
  as nnU-Net computes it: the weights far from the centre underflow and are set to the smallest one left, which
  decides the blend where only such corners overlap).

What is written here and why. nnU-Net's ``predict_sliding_window_return_logits`` runs under
``torch.inference_mode`` and accumulates in float16 with ``torch.div(..., out=)``, so no gradient can go
through it. :class:`NnUNetInferer` therefore evaluates the same blend (eq. 1 of :mod:`medexplain.engine.sliding`:
``O = sum_w P_w(g * f(x_w)) / sum_w P_w(g)``, padded as nnU-Net pads with ``pad_nd_image``) in the input's
dtype, and gives its window layout to :class:`medexplain.engine.sliding.SlidingWindowModel`, whose window-by-window
backward (eq. 2 there) is the exact gradient of that blend. The window network :class:`NnUNetNetwork`
is nnU-Net's test-time augmentation and ensemble, which are linear and per window, so they commute with
the blend: the mean over mirrored passes ``flip(f(flip(x_w)))`` over all non-empty subsets of the
checkpoint's ``inference_allowed_mirroring_axes`` plus the plain pass (``_internal_maybe_mirror_and_predict``)
and the mean over the folds (``predict_logits_from_preprocessed_data``). The explained score is thus the
mean of the passes' and folds' scores, as the prediction is their mean.

Reading the image: medexplain reads NIfTI with nibabel (voxel order ``x, y, z``); nnU-Net's
``SimpleITKIO`` and ``NibabelIO`` give the same voxels with the spatial axes reversed and the spacing
reversed, so that is what is fed to nnU-Net's preprocessor, and maps are reversed back (tests compare
with ``nnUNetPredictor`` reading the file itself). Limits: 3D configurations on 3D images (a ``2d``
configuration on a 3D volume and the cascade are refused), the readers named above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from medexplain.engine.core import Passes
from medexplain.errors import InputError, ModelLoadError, UnsupportedModelError
from medexplain.models.transforms import Prepared, Preprocessing, Preprocessor

__all__ = ["NnUNetModel", "NnUNetNetwork", "NnUNetInferer", "NnUNetPreprocessing", "load_nnunet", "as_nnunet",
           "order_channel_files", "case_stem", "find_trainer_class", "INSTALL"]

#: How to install the optional nnU-Net support without replacing the CPU torch (docs/nnunet.md).
INSTALL = ('pip install "medexplain[nnunet]" && pip install --no-deps nnunetv2==2.8.1 '
           '"dynamic-network-architectures>=0.4.4,<0.5"')
#: nnU-Net readers that give nibabel's voxels with the spatial axes reversed.
READERS = ("SimpleITKIO", "NibabelIO")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\.nii\.gz|\.nii|\.nrrd|\.mha|\.tif|\.png)$")


def _require():
    """nnunetv2 and its network package, or a :class:`~medexplain.errors.ModelLoadError` naming the install."""
    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"nnU-Net models need the optional package nnunetv2 ({e}); install it with: {INSTALL}") \
            from None


# --------------------------------------------------------------------------------------------------
# file names: nnU-Net's CASE_XXXX.nii.gz, one file per channel
# --------------------------------------------------------------------------------------------------
def order_channel_files(paths):
    """One file per channel as given, or ordered by nnU-Net's channel suffix (``case_0000.nii.gz``,
    ``case_0001.nii.gz``) when every name has one; the suffixes must then be 0..C-1 of one case."""
    if paths is None or isinstance(paths, (str, Path)):
        return paths
    paths = [Path(p) for p in paths]
    found = [_CHANNEL_FILE.match(p.name) for p in paths]
    if len(paths) < 2 or not all(found):
        return paths
    cases = {m["case"] for m in found}
    channels = sorted(int(m["channel"]) for m in found)
    if len(cases) != 1 or channels != list(range(len(paths))):
        raise InputError(f"nnU-Net channel files must be one case with the suffixes _0000.._{len(paths) - 1:04d}; got "
                         f"{[p.name for p in paths]}")
    return [p for _, p in sorted(zip((int(m["channel"]) for m in found), paths))]


def case_stem(path) -> str | None:
    """The case identifier of an nnU-Net channel file (``case_0000.nii.gz`` -> ``case``), else None."""
    m = _CHANNEL_FILE.match(Path(path).name)
    return m["case"] if m else None


# --------------------------------------------------------------------------------------------------
# the window network: mirroring and folds
# --------------------------------------------------------------------------------------------------
class NnUNetNetwork(Passes):
    """nnU-Net's prediction of one window (module docstring): the mean over ``networks`` (folds) and over
    the plain pass and every mirrored pass over the non-empty subsets of ``mirror_axes`` (spatial axes,
    0-based, as nnU-Net stores them; ``None``: no mirroring). It is :class:`medexplain.engine.core.Passes`, the
    members x flips of every ``mx.Model``, so gradients, pass counts and CAMs (each pass's cells flipped
    back, summed over the folds: ``docs/cam.md``) go through the one mechanism. nnU-Net explains logits
    (its networks end in a convolution); a deep-supervision list gives its full-resolution head."""

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int] | None = None):
        super().__init__(list(networks), mirror_axes)

    @property
    def folds(self) -> nn.ModuleList:
        return self.networks

    @property
    def passes(self) -> list:
        return self.flips


# --------------------------------------------------------------------------------------------------
# the sliding window: nnU-Net's window positions and Gaussian
# --------------------------------------------------------------------------------------------------
def _sliding_window_inferer_class():
    from monai.inferers import SlidingWindowInferer
    return SlidingWindowInferer


class NnUNetInferer(_sliding_window_inferer_class()):
    """A ``SlidingWindowInferer`` whose windows are nnU-Net's (module docstring): positions from
    ``nnUNetPredictor._internal_get_sliding_window_slicers`` at ``tile_step_size``, the Gaussian
    ``compute_gaussian(patch_size, sigma_scale=1/8, value_scaling_factor=10)`` (or constant weights),
    constant zero padding to the patch size as ``pad_nd_image``. :meth:`window_layout` is what
    :class:`medexplain.engine.sliding.SlidingWindowModel` reads instead of MONAI's placement."""

    def __init__(self, patch_size: Sequence[int], tile_step_size: float = 0.5, use_gaussian: bool = True,
                 sw_batch_size: int = 1):
        if not 0 < float(tile_step_size) <= 1:
            raise InputError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
        super().__init__(roi_size=[int(p) for p in patch_size], sw_batch_size=int(sw_batch_size),
                         overlap=max(0.0, 1.0 - float(tile_step_size)), mode="gaussian" if use_gaussian else "constant",
                         sigma_scale=0.125, padding_mode="constant", cval=0.0)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tile_step_size = float(tile_step_size)
        self.use_gaussian = bool(use_gaussian)

    def window_layout(self, image: Sequence[int], dtype, device) -> tuple[list, torch.Tensor]:
        """nnU-Net's windows on the padded grid ``image`` (one tuple of spatial slices each, in nnU-Net's
        order) and the importance map ``(1, 1, *patch)``."""
        from types import SimpleNamespace

        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        if len(image) != len(self.patch_size):
            raise UnsupportedModelError(f"the nnU-Net patch {self.patch_size} has {len(self.patch_size)} axes, the image "
                                        f"{tuple(image)} {len(image)}: a 2d configuration on a 3D volume is not supported")
        # nnU-Net's own slicer code, given the two settings it reads (no predictor state is needed)
        owner = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(self.patch_size)),
                                tile_step_size=self.tile_step_size, verbose=False)
        slicers = nnUNetPredictor._internal_get_sliding_window_slicers(owner, tuple(int(s) for s in image))
        slices = [tuple(s[1:]) for s in slicers]
        if self.use_gaussian:  # in float16, as nnU-Net computes it: its zeros become the smallest float16 value left
            g = compute_gaussian(self.patch_size, sigma_scale=1. / 8, value_scaling_factor=10,
                                 device=torch.device("cpu")).to(dtype=dtype, device=device)
        else:
            g = torch.ones(self.patch_size, dtype=dtype, device=device)
        return slices, g.reshape(1, 1, *self.patch_size)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        """Eq. (1) with nnU-Net's layout, in the input's dtype (nnU-Net accumulates in float16)."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        from medexplain.engine.core import chunks

        xp, revert = pad_nd_image(inputs, self.patch_size, "constant", {"value": 0}, True, None)
        slices, g = self.window_layout(xp.shape[2:], inputs.dtype, inputs.device)
        out = count = None
        for b in range(xp.shape[0]):
            for part in chunks(len(slices), int(self.sw_batch_size)):
                sl = slices[part]
                y = network(torch.cat([xp[(slice(b, b + 1), slice(None), *s)] for s in sl]))
                if out is None:
                    out = torch.zeros((xp.shape[0], y.shape[1], *xp.shape[2:]), dtype=inputs.dtype, device=inputs.device)
                    count = torch.zeros((1, 1, *xp.shape[2:]), dtype=inputs.dtype, device=inputs.device)
                for i, s in enumerate(sl):
                    out[(slice(b, b + 1), slice(None), *s)] += g * y[i:i + 1].to(inputs.dtype)
                    if b == 0:
                        count[(slice(None), slice(None), *s)] += g
        return (out / count)[(slice(None), slice(None), *revert[2:])]  # revert also slices the input channels


# --------------------------------------------------------------------------------------------------
# preprocessing and its inverse
# --------------------------------------------------------------------------------------------------
class NnUNetPreprocessing(Preprocessing):
    """The model's nnU-Net preprocessing as a :class:`medexplain.models.transforms.Preprocessing` (what the
    pipelines take): :meth:`build` gives the :class:`NnUNetPreprocessor`."""

    def __init__(self, model: "NnUNetModel"):
        super().__init__()
        self.model = model

    @property
    def active(self) -> bool:
        return True

    def describe(self) -> dict:
        cm, pm = self.model.configuration_manager, self.model.plans_manager
        return {"nnunet": str(self.model.folder), "configuration": self.model.configuration,
                "preprocessor": cm.preprocessor_name, "normalization_schemes": list(cm.normalization_schemes),
                "target_spacing": list(cm.spacing), "transpose_forward": list(pm.transpose_forward),
                "image_reader_writer": pm.image_reader_writer_class.__name__}

    def build(self) -> "NnUNetPreprocessor":
        return NnUNetPreprocessor(self)


def _spacing(affine: np.ndarray, nd: int) -> list[float]:
    return [float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:nd, :nd], axis=0)]


class NnUNetPreprocessor(Preprocessor):
    """:meth:`apply`: nnunetv2's preprocessor on an image read by medexplain; :meth:`invert`: a map back
    onto that image's grid as nnU-Net puts a prediction back (module docstring)."""

    def __init__(self, prep: NnUNetPreprocessing):
        super().__init__(None)
        self.prep = prep
        self.model = prep.model

    def apply(self, image: torch.Tensor, affine) -> Prepared:
        m = self.model
        m.check_image(image)
        affine = np.asarray(affine, dtype=np.float64)
        nd = image.ndim - 1
        data = image.detach().cpu().numpy().astype(np.float32).transpose(0, *range(nd, 0, -1))  # nnU-Net's axis order
        props = {"spacing": _spacing(affine, nd)[::-1]}
        pre = m.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case_npy(data, None, props, m.plans_manager, m.configuration_manager, m.dataset_json)
        x = torch.from_numpy(np.ascontiguousarray(data)).float()
        return Prepared(x, self._model_affine(affine, props, tuple(x.shape[1:])), tuple(int(s) for s in image.shape[1:]),
                        affine, props, ["nnunet"], None)

    def _model_affine(self, affine: np.ndarray, props: dict, shape: tuple) -> np.ndarray:
        """The voxel-to-world affine of the preprocessed grid: resampling (pixel centres kept, as skimage's
        ``resize`` maps them), the crop's offset, ``transpose_forward`` and the reversed axes, composed."""
        nd = len(shape)
        old = props["shape_after_cropping_and_before_resampling"]
        scale = np.array([o / n for o, n in zip(old, shape)], dtype=np.float64)
        start = np.array([b[0] for b in props["bbox_used_for_cropping"]], dtype=np.float64)
        to_crop = np.eye(nd + 1)
        to_crop[:nd, :nd] = np.diag(scale)
        to_crop[:nd, nd] = 0.5 * (scale - 1) + start
        perm = np.zeros((nd + 1, nd + 1))
        perm[nd, nd] = 1
        for k, t in enumerate(self.model.plans_manager.transpose_forward):
            perm[nd - 1 - t, k] = 1  # transposed axis k is nnU-Net axis t, i.e. nibabel axis nd-1-t
        return affine @ perm @ to_crop

    def invert(self, amap: torch.Tensor, prepared: Prepared, nearest: bool = False) -> torch.Tensor:
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        m, props = self.model, prepared.meta
        cm, pm = m.configuration_manager, m.plans_manager
        arr = amap.detach().cpu().double().numpy()
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        fn = cm.resampling_fn_seg if nearest else cm.resampling_fn_probabilities
        arr = np.asarray(fn(arr, props["shape_after_cropping_and_before_resampling"], cm.spacing, spacing_t))
        full = np.zeros((arr.shape[0], *props["shape_before_cropping"]), dtype=arr.dtype)
        full = insert_crop_into_image(full, arr, props["bbox_used_for_cropping"])
        nd = full.ndim - 1
        full = full.transpose([0] + [i + 1 for i in pm.transpose_backward]).transpose(0, *range(nd, 0, -1))
        out = torch.from_numpy(np.ascontiguousarray(full)).to(amap.dtype)
        if tuple(out.shape[1:]) != prepared.original_shape:
            raise InputError(f"the map could not be put back on the image grid: got {tuple(out.shape[1:])}, the image "
                             f"is {prepared.original_shape}")
        return out


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
@dataclass
class NnUNetModel:
    """A loaded nnU-Net model folder (:func:`load_nnunet`): one network per fold (eval mode, deep
    supervision off), the plans, and the settings of its inference. ``network`` is the window network
    (all folds, mirroring when ``use_mirroring``), ``inferer`` nnU-Net's sliding window, ``preprocessing``
    nnU-Net's preprocessing with its inverse: the three things every medexplain pipeline takes
    (``mx.explain(mx.Model(m.network, inferer=m.inferer), x, method, target)`` on ``x = m.prepare(img, affine).image[None]``)."""

    folder: Path
    configuration: str
    folds: tuple
    networks: list
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    trainer_name: str
    mirror_axes: tuple | None
    use_mirroring: bool = True
    tile_step_size: float = 0.5
    use_gaussian: bool = True
    sw_batch_size: int = 1
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def channel_names(self) -> list[str]:
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [str(names[k]) for k in sorted(names, key=int)]

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    def _axes(self):
        return self.mirror_axes if self.use_mirroring else None

    @property
    def network(self) -> NnUNetNetwork:
        if "network" not in self._cache:
            self._cache["network"] = NnUNetNetwork(self.networks, self._axes())
        return self._cache["network"]

    def fold_networks(self) -> list[NnUNetNetwork]:
        """One window network per fold (with mirroring when ``use_mirroring``): the fold models of
        :func:`medexplain.segmentation.shapley.fold_consensus`."""
        if "folds" not in self._cache:
            self._cache["folds"] = [NnUNetNetwork([n], self._axes()) for n in self.networks]
        return self._cache["folds"]

    @property
    def inferer(self) -> NnUNetInferer:
        return NnUNetInferer(self.patch_size, self.tile_step_size, self.use_gaussian, self.sw_batch_size)

    @property
    def preprocessing(self) -> NnUNetPreprocessing:
        return NnUNetPreprocessing(self)

    def check_image(self, image: torch.Tensor) -> None:
        """A typed error, before any work, for an image ``(C, *spatial)`` this model cannot take."""
        names = self.channel_names
        if image.ndim - 1 != len(self.patch_size):
            raise UnsupportedModelError(f"the nnU-Net configuration {self.configuration!r} has a {len(self.patch_size)}D "
                                        f"patch {self.patch_size}; the image {tuple(image.shape[1:])} has {image.ndim - 1} "
                                        "spatial axes (a 2d configuration on a 3D volume is not supported)")
        if image.shape[0] != len(names):
            raise InputError(f"the nnU-Net model takes {len(names)} channel(s) ({', '.join(names)}), one file per channel "
                             f"(CASE_0000.nii.gz, CASE_0001.nii.gz, ...) or one 4D file; got {image.shape[0]}")

    def prepare(self, image: torch.Tensor, affine) -> Prepared:
        """nnU-Net's preprocessing of an image read by medexplain (:func:`medexplain.io.read_channels`)."""
        return self.preprocessing.build().apply(image, affine)

    def model(self):
        """The network run by nnU-Net's sliding window (:class:`medexplain.engine.sliding.SlidingWindowModel`): the
        logits of a preprocessed batch ``(B, C, *s')`` with the window-by-window gradient."""
        from medexplain.engine.sliding import SlidingWindowModel
        return SlidingWindowModel(self.network, self.inferer)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, affine) -> torch.Tensor:
        """The segmentation on the image's own grid (nibabel order), as nnU-Net computes and exports it:
        the logits of :meth:`model` on the preprocessed image put back by nnunetv2's
        ``convert_predicted_logits_to_segmentation_with_correct_shape``."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        prep = self.prepare(image, affine)
        dtype = next(self.network.parameters()).dtype
        logits = self.model()(prep.image[None].to(dtype))[0].float().cpu()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, dict(prep.meta), num_threads_torch=1)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(seg).transpose(*range(seg.ndim - 1, -1, -1))))

    def describe(self) -> dict:
        return {"nnunet": str(self.folder), "configuration": self.configuration, "folds": list(self.folds),
                "trainer": self.trainer_name, "patch_size": list(self.patch_size),
                "mirror_axes": list(self._axes()) if self._axes() is not None else None,
                "tile_step_size": self.tile_step_size, "gaussian": self.use_gaussian, "channels": self.channel_names}

    def __str__(self) -> str:
        return f"nnU-Net {self.folder.name} {self.configuration} folds {','.join(map(str, self.folds))}"


def _load_checkpoint(path: Path, trusted: bool) -> dict:
    """An nnU-Net checkpoint. With ``weights_only`` (default) numpy scalars, which nnU-Net's training log
    holds, are allowed; a checkpoint that needs more needs ``trusted=True`` (nnU-Net itself unpickles all)."""
    try:
        if trusted:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
        # numpy 2 pickles numpy._core.multiarray.scalar, numpy 1 numpy.core.multiarray.scalar
        safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype] + \
            [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
        with torch.serialization.safe_globals(safe):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        hint = "" if trusted else " (if you trust this file, load it with trusted=True / --trust-checkpoint)"
        raise ModelLoadError(f"{path}: cannot read the nnU-Net checkpoint: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{hint}") from e


def find_trainer_class(name: str):
    """The nnU-Net trainer class ``name``, importing only the module that defines it.

    nnunetv2's ``recursive_find_trainer_class_by_name`` imports every module under
    ``nnunetv2.training.nnUNetTrainer`` until it finds the class, so one trainer that needs a package the
    install leaves out (the Primus trainers need ``timm``) breaks the lookup of every other trainer. Here the
    package's files (then those of the ``nnUNet_extTrainer`` folders, as nnU-Net searches them) are read as
    text for ``class <name>(`` and only the module that defines it is imported. Typed errors: no such class
    (with close matches), or its module needs a package that is not installed (naming it)."""
    import difflib
    import importlib
    import importlib.util
    import os

    import nnunetv2

    root = Path(nnunetv2.__path__[0])
    pattern = re.compile(rf"^class\s+{re.escape(name)}\s*[(:]", re.M)
    folders = [(root / "training" / "nnUNetTrainer", root.parent)]
    folders += [(Path(p), None) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    names = set()
    for folder, base in folders:
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            names.update(re.findall(r"^class\s+(\w+)\s*[(:]", text, re.M))
            if not pattern.search(text):
                continue
            try:
                if base is not None:
                    module = importlib.import_module(".".join(path.relative_to(base).with_suffix("").parts))
                else:   # a file of an nnUNet_extTrainer folder, imported by its path
                    spec = importlib.util.spec_from_file_location(f"_medexplain_ext_trainer_{path.stem}", path)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
            except ModuleNotFoundError as e:
                raise ModelLoadError(f"the checkpoint's trainer {name!r} is defined in {path}, which needs the package "
                                     f"{e.name!r}, not installed: pip install {e.name} (medexplain imports only this "
                                     "trainer's module)") from e
            except Exception as e:
                raise ModelLoadError(f"the checkpoint's trainer {name!r} is defined in {path}, which raised while "
                                     f"importing: {type(e).__name__}: {e}") from e
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                return cls
    close = difflib.get_close_matches(name, sorted(names), n=3)
    raise ModelLoadError(f"the checkpoint's trainer {name!r} is not a class in nnunetv2.training.nnUNetTrainer "
                         f"({folders[0][0]}) nor in the nnUNet_extTrainer folders"
                         + (f"; close matches: {', '.join(close)}" if close else ""))


def _build_network(trainer_name: str, pm, cm, n_in: int, n_out: int) -> nn.Module:
    """The trainer's ``build_network_architecture`` with deep supervision off. For ``nnUNetTrainer`` that
    method is ``get_network_from_plans(...)`` itself, called directly; other trainers are found by
    :func:`find_trainer_class` (only the module defining the trainer is imported)."""
    import inspect

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if trainer_name == "nnUNetTrainer":
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                      deep_supervision=False)
    cls = find_trainer_class(trainer_name)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    if not issubclass(cls, nnUNetTrainer):
        raise ModelLoadError(f"the checkpoint's trainer {trainer_name!r} is not an nnUNetTrainer subclass")
    if "plans_manager" in inspect.signature(cls.build_network_architecture).parameters:
        return cls.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    return cls.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                          enable_deep_supervision=False)


def _folds(folder: Path, folds, checkpoint: str) -> tuple:
    found = sorted(int(p.name.split("_")[1]) for p in folder.glob("fold_*")
                   if p.name.split("_")[1].isdigit() and (p / checkpoint).is_file())
    if folds is None:
        if not found:
            raise ModelLoadError(f"{folder}: no fold_K/{checkpoint}")
        return tuple(found)
    if isinstance(folds, (int, str)):
        folds = [folds]
    out = []
    for f in folds:
        f = "all" if str(f).strip() == "all" else f
        try:
            out.append(f if f == "all" else int(f))
        except (TypeError, ValueError):
            raise ModelLoadError(f"folds must be integers or 'all', got {f!r}") from None
    if not out:
        raise ModelLoadError("no fold given")
    missing = [f for f in out if not (folder / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: no {checkpoint} for fold(s) {missing}; folds with one: {found or 'none'}")
    return tuple(out)


def load_nnunet(folder, configuration: str = "3d_fullres", folds=(0,), checkpoint: str = "checkpoint_final.pth", *,
                use_mirroring: bool = True, tile_step_size: float = 0.5, use_gaussian: bool = True,
                sw_batch_size: int = 1, dtype: torch.dtype = torch.float32, trusted: bool = False) -> NnUNetModel:
    """Load the nnU-Net v2 trained-model folder ``folder`` (module docstring): ``plans.json``, ``dataset.json``
    and ``fold_K/<checkpoint>`` for each of ``folds`` (``None``: every fold with a checkpoint; ``"all"``:
    ``fold_all``). The networks are built by nnunetv2 from the plans' ``configuration`` (it must be the one
    the checkpoint was trained with), deep supervision off, in eval mode and ``dtype``. ``use_mirroring``,
    ``tile_step_size`` and ``use_gaussian`` are ``nnUNetPredictor``'s settings of the same names. Every
    problem (nnunetv2 missing, not a model folder, a missing fold or checkpoint, an unknown configuration,
    weights that do not fit) is a typed error raised here, before any work."""
    _require()
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"--nnunet {folder}: not a folder (an nnU-Net model folder is nnUNet_results/DatasetXXX/"
                             "Trainer__Plans__configuration, with plans.json, dataset.json and fold_K/checkpoint_final.pth)")
    missing = [n for n in ("plans.json", "dataset.json") if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(f"--nnunet {folder}: not an nnU-Net model folder: no {' and no '.join(missing)} (expected "
                             "plans.json, dataset.json and fold_K/checkpoint_final.pth)")
    use = _folds(folder, folds, checkpoint)
    try:
        plans, dataset_json = load_json(str(folder / "plans.json")), load_json(str(folder / "dataset.json"))
        pm = PlansManager(plans)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot read plans.json / dataset.json: {type(e).__name__}: {e}") from e
    if configuration not in plans.get("configurations", {}):
        raise ModelLoadError(f"{folder}/plans.json has no configuration {configuration!r}; it has "
                             f"{sorted(plans.get('configurations', {}))}")
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise UnsupportedModelError(f"{folder}/plans.json reads images with {reader}; medexplain feeds nnU-Net the "
                                    f"voxels of {' or '.join(READERS)} (NIfTI read by nibabel, axes reversed)")
    cm = pm.get_configuration(configuration)
    if cm.previous_stage_name is not None:
        raise UnsupportedModelError(f"the configuration {configuration!r} is a cascade stage (it takes the segmentation of "
                                    f"{cm.previous_stage_name!r} as input); cascades are not supported")
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    nets, trainer, axes = [], None, None
    for i, f in enumerate(use):
        path = folder / f"fold_{f}" / checkpoint
        ck = _load_checkpoint(path, trusted)
        if not isinstance(ck, dict) or "network_weights" not in ck:
            raise ModelLoadError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
        trained = (ck.get("init_args") or {}).get("configuration")
        if trained is not None and trained != configuration:
            raise ModelLoadError(f"{path} was trained with the configuration {trained!r}, not {configuration!r}: give "
                                 f"configuration={trained!r} (--configuration {trained})")
        if i == 0:
            trainer = ck.get("trainer_name", "nnUNetTrainer")
            axes = ck.get("inference_allowed_mirroring_axes")
        net = _build_network(trainer, pm, cm, n_in, n_out)
        try:
            net.load_state_dict(ck["network_weights"])
        except Exception as e:
            raise ModelLoadError(f"{path}: the weights do not fit the network of the plans: {e}") from e
        nets.append(net.to(dtype).eval())
    return NnUNetModel(folder, configuration, use, nets, pm, cm, dataset_json, trainer,
                       None if axes is None else tuple(int(a) for a in axes), bool(use_mirroring),
                       float(tile_step_size), bool(use_gaussian), int(sw_batch_size))


def as_nnunet(model_or_folder, **options) -> NnUNetModel:
    """An :class:`NnUNetModel` as is, or :func:`load_nnunet` of a folder (with ``options``)."""
    if isinstance(model_or_folder, NnUNetModel):
        return model_or_folder
    return load_nnunet(model_or_folder, **options)
