"""Example inputs that install with medexplain, for the docs, the tests and a first try of the CLI.

:func:`path` returns where a real test file of an installed package lies (pydicom's CT and MR slices,
pydicom-data's chest radiograph, nibabel's T1 volume, deepbet's brain-extraction U-Net); :func:`write`
copies those and writes small generated ones (a TorchScript classifier and U-Net, a factory module with
its weights, a MONAI bundle, an nnU-Net v2 model folder with an nnU-Net-named case, a run manifest) into a
folder with one call. Every code block of ``README.md`` and ``docs/*.md`` runs on these
(``tests/test_docs.py``). The generated models have random weights (seeded): they exercise the machinery,
they explain nothing about anatomy; the trained demo models are :func:`medexplain.models.zoo.pretrained`.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import shutil
from pathlib import Path

from medexplain.errors import InputError

__all__ = ["INSTALLED", "GENERATED", "names", "path", "write"]

#: name -> (what it is, how to find it): real test files of installed packages.
INSTALLED = {
    "ct_small": ("CT_small.dcm: one 128x128 axial CT slice in HU (pydicom test file), with patient geometry",
                 ("pydicom", "CT_small.dcm")),
    "mr_small": ("MR_small.dcm: one 64x64 MR slice (pydicom test file), with patient geometry",
                 ("pydicom", "MR_small.dcm")),
    "chest_xray": ("RG1_UNCR.dcm: a 1955x1841 PA chest radiograph (CR, pydicom-data), PatientOrientation L\\F, "
                   "no pixel spacing", ("pydicom", "RG1_UNCR.dcm")),
    "anatomical": ("anatomical.nii: nibabel's real T1 volume, 33x41x25 voxels of 2 mm", ("nibabel", "anatomical.nii")),
    "example4d": ("example4d.nii.gz: nibabel's small 4D functional series", ("nibabel", "example4d.nii.gz")),
    "deepbet": ("model.pt: deepbet 1.0.2's traced brain-extraction U-Net (TorchScript; softmax output, sides "
                "divisible by 32), installed with `pip install --no-deps deepbet==1.0.2` (the Makefile does)",
                ("deepbet", "data/models/model.pt")),
}

#: name -> what :func:`write` makes (random, seeded weights; a few kB each).
GENERATED = {
    "classifier.pt": "TorchScript 2D classifier (zoo.classifier_2d(1, 2)): 1 channel in, 2 logits out",
    "unet.pt": "TorchScript 3D MONAI U-Net: 2 channels in (e.g. T1 + FLAIR), 2 classes out, sides divisible by 4",
    "mynets.py": "a factory module: mynets:classifier (zoo.classifier_2d(1, 2); CAM layer layer4) and mynets:unet "
                 "(the 3D U-Net above); weights in classifier_weights.pt and unet_weights.pt",
    "case": "case_0000.nii.gz, case_0001.nii.gz (two contrasts of one 16x16x16 case, nnU-Net's channel naming), "
            "case.nii.gz (the same as one 4D file, channels last) and lesion.nii.gz (a lesion mask)",
    "bundle": "tiny_bundle/: a MONAI bundle (configs/inference.json, models/model.pt) with a 2-channel 3D U-Net, "
              "its preprocessing, a SlidingWindowInferer and postprocessing",
    "nnunet": "Dataset999_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres/: an nnU-Net v2 model folder (plans.json, "
              "dataset.json, fold_0, fold_1) with 2 channels (T1, CT) and 2 foreground labels; needs the nnunet "
              "extra (docs/nnunet.md)",
    "cases.csv": "a run manifest of 2 slices (CT_small.dcm, MR_small.dcm; columns image, label, case_id), the images beside it",
}


def names() -> list[str]:
    """Every name :func:`path` and :func:`write` know."""
    return [*INSTALLED, *GENERATED]


def path(name: str) -> Path:
    """The file of an installed example (:data:`INSTALLED`), e.g. ``path("ct_small")``; a typed error naming
    the others for an unknown name, or when the package holding it is not installed."""
    if name not in INSTALLED:
        raise InputError(f"unknown example {name!r}; installed examples: {', '.join(INSTALLED)} "
                         f"(write() also makes {', '.join(GENERATED)})")
    package, rel = INSTALLED[name][1]
    try:
        if package == "pydicom":
            import pydicom.data
            return Path(pydicom.data.get_testdata_file(rel))
        if package == "nibabel":
            p = Path(str(importlib.resources.files("nibabel") / "tests" / "data" / rel))
        else:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(f"the package {package!r} is not installed")
            p = Path(list(spec.submodule_search_locations)[0]).parent / rel
        if not p.exists():
            raise FileNotFoundError(str(p))
        return p
    except Exception as e:
        raise InputError(f"example {name!r} ({INSTALLED[name][0]}) is not available: {e}") from e


def write(folder=".", which=None) -> dict[str, Path]:
    """Write the examples ``which`` (default: all that are available; names of :func:`names`) into ``folder``
    and return ``{name: path}``. Installed files are copied under their own file names (``CT_small.dcm``,
    ``RG1_UNCR.dcm``, ``anatomical.nii``, ...; deepbet's model as ``deepbet.pt``); existing files are replaced,
    so call it on a folder of its own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    explicit = which is not None
    which = list(names() if which is None else ([which] if isinstance(which, str) else which))
    unknown = [w for w in which if w not in names()]
    if unknown:
        raise InputError(f"unknown example(s) {unknown}; known: {', '.join(names())}")
    out = {}
    for name in which:
        try:
            out[name] = _WRITERS[name](folder) if name in _WRITERS else _copy(name, folder)
        except InputError:
            if explicit:
                raise   # asked for by name: say why it is missing; in "all", skip what is not installed
    return out


def _copy(name: str, folder: Path) -> Path:
    src = path(name)
    dst = folder / ("deepbet.pt" if name == "deepbet" else src.name)
    shutil.copyfile(src, dst)
    return dst


def _classifier():
    import torch

    from medexplain.models import zoo
    torch.manual_seed(0)
    return zoo.classifier_2d(1, 2).eval()


def _unet():
    import torch
    from monai.networks.nets import UNet
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1).eval()


def _torchscript(make, example_shape, dst: Path) -> Path:
    import torch
    net = make()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.randn(example_shape))
    torch.jit.save(traced, str(dst))
    return dst


_MYNETS = '''"""Model factories for `--model mynets:classifier --weights classifier_weights.pt` (medexplain.examples)."""
from medexplain import examples


def classifier():
    return examples._classifier()


def unet():
    return examples._unet()
'''


def _write_mynets(folder: Path) -> Path:
    from medexplain.models.training import save_weights
    save_weights(_classifier(), folder / "classifier_weights.pt")
    save_weights(_unet(), folder / "unet_weights.pt")
    (folder / "mynets.py").write_text(_MYNETS)
    return folder / "mynets.py"


def _write_case(folder: Path) -> Path:
    import nibabel as nib
    import numpy as np
    rng = np.random.default_rng(0)
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    img = rng.normal(size=(16, 16, 16, 2)).astype(np.float32) * 0.3
    lesion = np.zeros((16, 16, 16), np.uint8)
    lesion[9:13, 4:8, 6:10] = 1                          # bright in channel 1 (FLAIR-like), faint in channel 0
    img[..., 1] += 2.0 * lesion
    img[..., 0] += 0.3 * lesion
    for c in range(2):
        nib.save(nib.Nifti1Image(img[..., c], aff), str(folder / f"case_{c:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(img, aff), str(folder / "case.nii.gz"))
    nib.save(nib.Nifti1Image(lesion, aff), str(folder / "lesion.nii.gz"))
    return folder / "case_0000.nii.gz"


def bundle_config(roi=(8, 8, 8)) -> dict:
    """configs/inference.json laid out as the MONAI Model Zoo's spleen_ct_segmentation bundle (2 input channels,
    a 2-class MONAI UNet, a sliding window of ``roi``); the tests build their bundles from it too."""
    return {
        "imports": ["$import torch"], "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2,
                        "channels": [4, 8], "strides": [2], "num_res_units": 0},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2, "overlap": 0.25,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"}]},
    }


def _write_bundle(folder: Path) -> Path:
    import torch
    from monai.networks.nets import UNet
    root = folder / "tiny_bundle"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(bundle_config(), indent=2))
    torch.manual_seed(0)
    torch.save(UNet(3, 2, 2, channels=(4, 8), strides=(2,), num_res_units=0).state_dict(), root / "models" / "model.pt")
    return root


def nnunet_plans(patch_size=(8, 8, 8), median_shape=(16, 16, 16), original_spacing=(1.5, 1.0, 1.0),
                 original_shape=(16, 16, 16)) -> dict:
    """plans.json of a tiny nnU-Net v2 3d_fullres model (a 2-stage PlainConvUNet, two channels: z-scored T1
    and CT-normalised, spacing 1.5 x 1 x 1 mm) as nnU-Net's planner writes it; the tests build their folders
    from it too, with their own median and original geometry."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    res = {"resampling_fn_data": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
           "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": list(patch_size), "median_image_size_in_voxels": list(median_shape), "spacing": [1.5, 1.0, 1.0],
           "normalization_schemes": ["ZScoreNormalization", "CTNormalization"], "use_mask_for_norm": [False, False],
           "architecture": arch, "batch_dice": False, **res}
    fg = {"max": 3.0, "mean": 0.5, "median": 0.4, "min": -2.0, "percentile_00_5": -1.5, "percentile_99_5": 2.5,
          "std": 0.8}
    return {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(original_spacing),
            "original_median_shape_after_transp": list(original_shape),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": cfg}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": fg, "1": fg}}


NNUNET_DATASET = {"channel_names": {"0": "T1", "1": "CT"}, "labels": {"background": 0, "lesion": 1, "edema": 2},
                   "numTraining": 2, "file_ending": ".nii.gz"}


def _write_nnunet(folder: Path) -> Path:
    import torch
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as e:
        raise InputError(f"the nnU-Net example needs the nnunet extra (docs/nnunet.md): {e}") from e
    root = folder / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    root.mkdir(parents=True, exist_ok=True)
    plans = nnunet_plans()
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    (root / "dataset.json").write_text(json.dumps(NNUNET_DATASET, indent=2))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 2, 3, allow_init=True,
                                     deep_supervision=False)
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "current_epoch": 1000,
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                                  "dataset_json": NNUNET_DATASET},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
                   root / f"fold_{fold}" / "checkpoint_final.pth")
    return root


def _write_manifest(folder: Path) -> Path:
    rows = ["image,label,case_id"]
    for name, label in (("ct_small", 0), ("mr_small", 1)):
        rows.append(f"{_copy(name, folder).name},{label},{name}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


_WRITERS = {
    "classifier.pt": lambda f: _torchscript(_classifier, (1, 1, 64, 64), f / "classifier.pt"),
    "unet.pt": lambda f: _torchscript(_unet, (1, 2, 16, 16, 16), f / "unet.pt"),
    "mynets.py": _write_mynets,
    "case": _write_case,
    "bundle": _write_bundle,
    "nnunet": _write_nnunet,
    "cases.csv": _write_manifest,
}
