"""The one declaration of the command line's shared options (issue 23).

Every option that more than one command takes is declared once here, in :data:`OPTIONS`: its flag(s), type,
default, help and the parser's check (choices as ``Literal`` types, ranges, the method list, the device). A command names
the options it takes with :func:`takes`, which adds them to its signature (Typer builds the flags from it) and
hands them to the command packed in one :class:`Flags`. So the same option has the same name, type, default
and help in every command, and ``tests/test_cli_params.py`` checks it.

Rules applied everywhere:

* booleans are flag pairs (``--overwrite/--no-overwrite``), never a ``<bool>`` value;
* choices are listed in the help and checked by the parser, before any import of torch;
* ``--out DIR`` is every command's output folder, default ``medexplain_out`` in the current folder;
* an option whose sensible default differs between commands (``--method``, ``--chunk-size``) defaults to
  "the command's default", and its help names each command's.

This module imports neither torch nor any medexplain module that does: ``medexplain --help`` reads only it.
The method names, aliases and defaults are read from the methods' own declarations (:func:`declared_methods`).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer

#: The folder of the method modules, whose ``@register(...)`` declarations :func:`declared_methods` reads.
METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


@dataclass(frozen=True)
class Declared:
    """What the command line needs of the registered methods, as they declare it: ``names`` (sorted),
    ``aliases`` (spelling -> name), ``default`` (``mx.explain``'s) and ``instance_default`` (the instance
    API's, declared ``default=True`` with ``regions=True``)."""

    names: tuple
    aliases: dict
    default: str
    instance_default: str


@functools.lru_cache(maxsize=1)
def declared_methods() -> Declared:
    """The registry's names, aliases and defaults read from the methods' own ``@register(...)`` declarations
    with ``ast`` (no import of torch, so parsing and ``--help`` stay fast; no copy to keep in step:
    ``tests/test_cli_params.py`` checks the reading against the registry)."""
    import ast

    names, aliases, default, instance_default = [], {}, None, None
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                continue
            name = node.args[0].value
            kw = {k.arg: k.value for k in node.keywords}
            names.append(name)
            if "aliases" in kw:
                aliases.update({a.value: name for a in kw["aliases"].elts})
            if getattr(kw.get("default"), "value", False):
                if getattr(kw.get("regions"), "value", False):
                    instance_default = name
                else:
                    default = name
    return Declared(tuple(sorted(names)), aliases, default, instance_default)


#: medexplain.models.transforms.INTENSITY_HELP (a test checks they agree).
INTENSITY_HELP = "zscore, percentile:LOW,HIGH (e.g. percentile:0.5,99.5), range:LOW,HIGH (e.g. range:-1000,1000) or none"
#: medexplain.engine.ops.ACTIVATIONS.
ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")


def canonical_method(name: str) -> str | None:
    """The registered name of ``name`` (the registry's spelling rules), or None."""
    d = declared_methods()
    if name in d.names:
        return name
    key = name.lower().replace("-", "_")
    key = d.aliases.get(key, key)
    return key if key in d.names else None


def parse_methods(value) -> str:
    """``--method``: comma-separated names, each checked against the registered ones (:func:`declared_methods`;
    a close match suggested); returns the registered names, comma-separated."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        raise typer.BadParameter("no method given", param_hint="--method")
    out = []
    for n in names:
        c = canonical_method(n)
        if c is None:
            close = difflib.get_close_matches(n, declared_methods().names, n=3)
            raise typer.BadParameter(f"unknown method {n!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
                                     + " See `medexplain methods`.", param_hint="--method")
        out.append(c)
    return ",".join(out)


def parse_device(value) -> str:
    """``--device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    v = str(value).strip().lower()
    if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v):
        return v
    raise typer.BadParameter(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param_hint="--device")


def parse_formats(value) -> str:
    """``--format``: comma-separated names of :data:`FORMATS`."""
    items = [v.strip().lower() for v in str(value).split(",") if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise typer.BadParameter(f"unknown format(s) {bad or [value]}; choose any of {', '.join(FORMATS)} "
                                 "(comma-separated)", param_hint="--format")
    return ",".join(items)


def parse_dicom_threshold(value) -> str:
    """``--dicom-threshold``: ``otsu``, ``otsu_float`` or a number in [0, 1] (the ``metrics`` rule)."""
    v = str(value).strip().lower()
    if v in ("otsu", "otsu_float"):
        return v
    try:
        ok = 0 <= float(v) <= 1
    except ValueError:
        ok = False
    if not ok:
        raise typer.BadParameter(f"use otsu, otsu_float or a number in [0, 1], got {value!r}",
                                 param_hint="--dicom-threshold")
    return v


def parse_overlap(value) -> float:
    """``--overlap``: a number in [0, 1)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0 <= v < 1:
        raise typer.BadParameter(f"must be a number in [0, 1), got {value!r}", param_hint="--overlap")
    return v


@dataclass(frozen=True)
class Opt:
    """One option: its flags (``"--overwrite/--no-overwrite"`` for a boolean), Python type (``Literal[...]``
    for a choice: Typer lists and checks it), default, help, further ``typer.Option`` settings (``parser``,
    ``min``, ``metavar``), old spellings kept as hidden aliases, and its help panel."""

    decls: tuple
    type: Any
    default: Any
    help: str
    settings: dict = field(default_factory=dict, hash=False)
    aliases: tuple = ()
    panel: str | None = None

    def option(self):
        return typer.Option(self.default, *self.decls, help=self.help, rich_help_panel=self.panel, **self.settings)

    def alias_option(self, flag: str):
        return typer.Option(None, flag, hidden=True, help=f"old spelling of {self.decls[0]}",
                            **{k: v for k, v in self.settings.items() if k in ("parser", "min", "max")})


MODEL, PREP, SLIDING, NNUNET, TARGET, METHODS, OUTPUT, DICOM = ("model", "preprocessing", "sliding window",
                                                               "nnU-Net v2", "target", "methods", "output",
                                                               "DICOM output and PACS")
#: medexplain.io.dicom.FORMATS (a test checks they agree).
FORMATS = ("nifti", "png", "dicom")
_METHOD_LIST = ", ".join(declared_methods().names)

#: Every shared option, by parameter name.
OPTIONS: dict[str, Opt] = {
    # -- the model --
    "model": Opt(("--model", "-m"), List[str], [], "the model: a TorchScript file, package.module:factory (with "
                 "--weights) or zoo:<task>; repeated: an ensemble, the mean of their scores (shapley: one value per "
                 "model, e.g. per fold)", panel=MODEL),
    "weights": Opt(("--weights",), List[str], [], "state dict of a package.module:factory --model (repeat in the "
                   "order of --model)", panel=MODEL),
    "bundle": Opt(("--bundle",), Optional[Path], None, "a MONAI bundle folder (configs/inference.json, "
                  "models/model.pt) instead of --model: its network, preprocessing and inferer", panel=MODEL),
    "flip_axes": Opt(("--flip-axes",), Optional[str], None, "test-time flips over these spatial axes (0-based, "
                     "comma-separated, e.g. 0,1,2): the mean over the plain pass and every flipped pass (2^n), as "
                     "nnU-Net's mirroring; gradients and CAMs are exact through them (mx.Model)", panel=MODEL),
    "eval": Opt(("--eval",), Literal["auto", "always", "never"], "auto", "train/eval policy: auto (a model entirely "
                "in training mode is switched to eval; one in mixed modes is used as given), always, or never",
                panel=MODEL),
    "memory": Opt(("--memory",), Optional[float], None, "memory budget in GB of one model call (default: half the "
                  "memory available): the rows per call are capped to fit, and a method that cannot fit one row is "
                  "refused before any compute", panel=MODEL),
    "device": Opt(("--device",), str, "auto", "where the model runs: auto (CUDA when present), cpu, cuda or cuda:N",
                  {"parser": parse_device, "metavar": "auto|cpu|cuda[:N]"}, panel=MODEL),
    "amp": Opt(("--amp/--no-amp",), bool, False, "mixed precision for the model's forward (autocast: float16 on CUDA, "
               "bfloat16 on the CPU; maps stay in the input's dtype); methods that do not tolerate it (LRP, DeepLIFT) "
               "refuse it: docs/devices.md", panel=MODEL),
    # -- nnU-Net v2 --
    "nnunet": Opt(("--nnunet",), Optional[Path], None, "an nnU-Net v2 trained-model folder (plans.json, dataset.json, "
                  "fold_K/checkpoint_final.pth) instead of --model: its networks, preprocessing, sliding window and "
                  "mirroring", panel=NNUNET),
    "folds": Opt(("--folds",), str, "0", "with --nnunet: comma-separated folds (the mean of their scores), e.g. "
                 "0,1,2,3,4, or all (fold_all)", panel=NNUNET),
    "mirroring": Opt(("--mirroring/--no-mirroring",), bool, True, "with --nnunet: the mean over nnU-Net's mirrored "
                     "test-time passes, as nnU-Net predicts", panel=NNUNET),
    "configuration": Opt(("--configuration",), str, "3d_fullres", "with --nnunet: the plans' configuration the folder "
                         "was trained with", panel=NNUNET),
    "trust_checkpoint": Opt(("--trust-checkpoint/--no-trust-checkpoint",), bool, False, "with --nnunet: unpickle "
                            "checkpoints fully (as nnU-Net does); default: tensors and plain values only", panel=NNUNET),
    # -- preprocessing --
    "spacing": Opt(("--spacing",), Optional[str], None, "resample to this voxel spacing in mm (one value, or one per "
                   "axis: 1,1,2)", panel=PREP),
    "orientation": Opt(("--orientation",), Optional[str], None, "reorient to these axis codes first, e.g. RAS",
                       panel=PREP),
    "spatial_size": Opt(("--spatial-size",), Optional[str], None, "centred pad/crop to this size (e.g. 128,128,64)",
                        panel=PREP),
    "min_spatial_size": Opt(("--min-spatial-size",), Optional[str], None, "centred pad up to at least this size (one "
                            "value, or one per axis; never crops); with --divisible-by K: at least this size and a "
                            "multiple of K (e.g. --min-spatial-size 128 --divisible-by 16)", panel=PREP),
    "divisible_by": Opt(("--divisible-by",), Optional[str], None, "pad every side up to a multiple of N (the model's "
                        "stride); with --min-spatial-size: at least that size and a multiple of N", panel=PREP),
    "intensity": Opt(("--intensity",), Optional[str], None, f"intensity normalisation: {INTENSITY_HELP}", panel=PREP),
    "transform": Opt(("--transform",), Optional[str], None, "package.module:factory returning a MONAI Compose "
                     "(dictionary or array transforms) applied before the model and inverted for the maps (the "
                     "current folder is importable)", panel=PREP),
    # -- sliding windows --
    "roi_size": Opt(("--roi-size",), Optional[str], None, "run the model by sliding windows of this size (one value, "
                    "or one per axis: 96,96,64), as MONAI's SlidingWindowInferer; gradients are taken window by window",
                    panel=SLIDING),
    "overlap": Opt(("--overlap",), float, 0.25, "sliding-window overlap in [0, 1) (with --roi-size)",
                   {"parser": parse_overlap, "metavar": "FLOAT"}, panel=SLIDING),
    "sw_batch_size": Opt(("--sw-batch-size",), int, 1, "windows per model call (with --roi-size)",
                         {"min": 1}, panel=SLIDING),
    "sw_mode": Opt(("--sw-mode",), Literal["constant", "gaussian"], "constant", "blending of overlapping windows "
                   "(with --roi-size)", panel=SLIDING),
    # -- what to explain --
    "target": Opt(("--target",), Optional[str], None, "class index, or predicted: a classifier's top class, a "
                  "segmenter's foreground class with the most predicted voxels (default: predicted; shapley: the value "
                  "of --value)", panel=TARGET),
    "region": Opt(("--region",), Optional[str], None, "segmenters: predicted (the model's predicted region of the "
                  "class; the default, shapley's is all), all (the class over the whole image), or a mask file "
                  "(NIfTI/PNG/NPY/DICOM, resampled onto the image grid by its geometry; instances: its connected "
                  "components are the instances)", panel=TARGET),
    "activation": Opt(("--activation",), Literal[ACTIVATIONS], "auto", "the model's output activation: auto "
                      "(outputs in [0, 1] summing to 1 over channels, or a final Softmax/Sigmoid, are probabilities; "
                      "else softmax for several channels, sigmoid for one), softmax, sigmoid, or none (already "
                      "probabilities)", panel=TARGET),
    "output": Opt(("--output",), Optional[str], None, "which model output to explain when it returns a tuple (index), "
                  "stacked heads (B, heads, K, ...; index) or a dict (key); default: the first element, a one-key "
                  "dict's value", panel=TARGET),
    "series": Opt(("--series",), Optional[str], None, "SeriesInstanceUID to read when an image is a folder holding "
                  "several DICOM series (the error lists them)", panel=TARGET),
    # -- methods --
    "method": Opt(("--method",), Optional[str], None, "comma-separated method names (default: "
                  f"{declared_methods().default}; instances: {declared_methods().instance_default}; demo: every "
                  f"method that applies), of: {_METHOD_LIST}",
                  {"parser": parse_methods, "metavar": "METHOD[,METHOD...]"},
                  aliases=("--methods",), panel=METHODS),
    "layer": Opt(("--layer",), Optional[str], None, "the layer of CAM methods (a dotted module name); default: the "
                 "method's own choice", panel=METHODS),
    "option": Opt(("--option", "-o"), List[str], [], "method option key=value (repeatable), typed by the method "
                  "(-o abs=false, -o n_samples=20); goes to every chosen method that accepts it, or method.key=value "
                  "for one", panel=METHODS),
    "skip_unsupported": Opt(("--skip-unsupported/--no-skip-unsupported",), bool, False, "explain with the methods "
                            "that apply to the model and record the others as skipped (default: fail before any "
                            "compute)", panel=METHODS),
    "seed": Opt(("--seed",), int, 0, "seed of all randomness (method noise and sampling, bootstrap, training)",
                panel=METHODS),
    "chunk_size": Opt(("--chunk-size",), Optional[int], None, "rows per forward pass (default: instances 10, "
                      "shapley 16)", {"min": 1}, panel=METHODS),
    "contrasts": Opt(("--contrasts",), Optional[str], None, "comma-separated names of the input channels (contrasts), "
                     "e.g. T1,T1c,T2,FLAIR (default: channel 0, channel 1, ...)", aliases=("--channel-names",),
                     panel=TARGET),
    "batch_size": Opt(("--batch-size",), Optional[int], None, "samples per batch (default: run 4 cases per chunk of "
                      "work; train 32 images per step)", {"min": 1}),
    # -- DICOM outputs and the PACS (docs/dicom.md) --
    "format": Opt(("--format",), Optional[str], None, "outputs, comma-separated: nifti (maps on the input's affine), "
                  "png (figures), dicom (a Parametric Map, a Segmentation and a Secondary Capture per map in the "
                  "source study; docs/dicom.md). Default: explain nifti,png; instances nifti,png; run its map only "
                  "(always written, as --map-format; png and dicom add the figures and DICOM objects per case)",
                  {"parser": parse_formats, "metavar": "nifti,png,dicom"}, panel=DICOM),
    "dicom_reference": Opt(("--dicom-reference",), Optional[Path], None, "with --format dicom and a NIfTI/PNG input: "
                           "the DICOM series (folder or file) it was made from, whose study and frame of reference the "
                           "objects join (the map is resampled onto it)", panel=DICOM),
    "dicom_threshold": Opt(("--dicom-threshold",), str, "otsu", "the SEG's binarisation, as the metrics: otsu "
                           "(CheXlocalize's), otsu_float, or a number in [0, 1] on the min-max normalised map",
                           {"parser": parse_dicom_threshold, "metavar": "otsu|otsu_float|NUMBER"}, panel=DICOM),
    "pacs": Opt(("--pacs",), Optional[str], None, "a DICOMweb URL (e.g. https://pacs/dicom-web): read --study "
                "[--series] (run: the manifest's study column) from it and store the DICOM objects back; "
                "credentials from MEDEXPLAIN_PACS_TOKEN, "
                "MEDEXPLAIN_PACS_USER + MEDEXPLAIN_PACS_PASSWORD (or *_FILE) or a netrc entry, never a flag",
                panel=DICOM),
    "study": Opt(("--study",), Optional[str], None, "with --pacs: the StudyInstanceUID (run: refused; the "
                 "manifest's study column names each case's)", panel=DICOM),
    "pacs_netrc": Opt(("--pacs-netrc",), Optional[Path], None, "with --pacs: a netrc file holding the PACS host's "
                      "login (default ~/.netrc)", panel=DICOM),
    "pacs_ca_bundle": Opt(("--pacs-ca-bundle",), Optional[Path], None, "with --pacs: the CA certificates to verify "
                          "the PACS's TLS certificate with", panel=DICOM),
    # -- output --
    "out": Opt(("--out",), Path, Path("medexplain_out"), "output folder, created (run: a run folder, continued with "
               "--resume)", panel=OUTPUT),
    "overwrite": Opt(("--overwrite/--no-overwrite",), bool, False, "replace this command's files already in --out "
                     "(default: refuse, naming them)", panel=OUTPUT),
    "figure": Opt(("--figure",), List[str], [], "PNG figure option key=value (repeatable): alpha=0.4 (opacity), "
                  "percentile=99.5 (colour limit), cmap=viridis, planes=axial,coronal, point=I,J,K (the voxel the "
                  "volume planes cut through); docs/io.md (run: the figures of --format png)", panel=OUTPUT),
    "report": Opt(("--report/--no-report",), bool, False, "also write an HTML report: explain <stem>_report.html (the "
                  "input, each method's map, a tri-planar viewer for volumes); run report.html, the index of the run "
                  "(cases x methods: status, links to maps and figures, error messages)", panel=OUTPUT),
}

#: Named groups of options.
PREPROCESSING = ("spacing", "orientation", "spatial_size", "min_spatial_size", "divisible_by", "intensity", "transform")
SLIDING_WINDOW = ("roi_size", "overlap", "sw_batch_size", "sw_mode")
NNUNET_FLAGS = ("nnunet", "folds", "mirroring", "configuration", "trust_checkpoint")
MODEL_INPUT = (*PREPROCESSING, *SLIDING_WINDOW, *NNUNET_FLAGS, "device", "amp", "flip_axes", "eval", "memory")
#: The DICOM-output options (issue 24): ``explain``, ``instances`` and ``run`` take them.
FORMAT_OUTPUT = ("format", "dicom_reference", "dicom_threshold")
#: The output and PACS options (issue 24; docs/dicom.md): ``explain`` and ``run`` take them.
DICOM_OUTPUT = (*FORMAT_OUTPUT, "pacs", "study", "pacs_netrc", "pacs_ca_bundle")
#: Everything ``explain`` takes besides its images and :data:`DICOM_OUTPUT`; ``run`` takes all of it too.
EXPLAIN = ("model", "weights", "bundle", "method", "target", "region", "layer", "option", "activation", "output",
           "skip_unsupported", "seed", "series", "out", "overwrite", "report", "figure", *MODEL_INPUT)


class Flags(dict):
    """A command's shared options by parameter name (also as attributes), with the conversions the library takes.
    Everything here is text handling; nothing imports torch."""

    __getattr__ = dict.__getitem__

    def methods(self, default: str | None = None) -> list[str]:
        return split_list(self["method"] or default)

    def preprocessing(self) -> dict:
        """The preprocessing flags that are set, as the fields of ``medexplain.models.transforms.Preprocessing``."""
        return {k: self[k] for k in PREPROCESSING if self.get(k) not in (None, "")}

    def inferer(self) -> dict | None:
        """The sliding-window flags as the settings dict the pipelines take (None without --roi-size)."""
        if self["roi_size"] is None:
            return None
        try:
            roi = [int(v) for v in split_list(self["roi_size"].replace("x", ","))]
        except ValueError:
            raise typer.BadParameter(f"must be integers separated by commas, got {self['roi_size']!r}",
                                     param_hint="--roi-size") from None
        return {"roi_size": roi[0] if len(roi) == 1 else roi, "overlap": self["overlap"],
                "sw_batch_size": self["sw_batch_size"], "mode": self["sw_mode"]}

    def nnunet_options(self) -> dict:
        """The options of ``medexplain.models.nnunet.load_nnunet`` the nnU-Net flags give."""
        return {"configuration": self["configuration"], "folds": split_list(self["folds"]),
                "use_mirroring": self["mirroring"], "trusted": self["trust_checkpoint"]}

    def model_spec(self):
        """The :class:`medexplain.models.spec.ModelSpec` of the model flags this command takes (``--model``,
        ``--weights``, ``--bundle``, ``--nnunet`` and its options, ``--output``, ``--activation``, the preprocessing
        and sliding-window flags, ``--flip-axes``, ``--device``, ``--eval``, ``--amp``), checked
        (:meth:`~medexplain.models.spec.ModelSpec.check`: contradicting sources are an ``OptionError`` before
        anything loads). Imports no torch."""
        from medexplain.models.spec import ModelSpec

        nnunet = self.get("nnunet")
        return ModelSpec(source=self.models("model"), weights=self.models("weights"), bundle=self.get("bundle"),
                         nnunet=nnunet, nnunet_options=self.nnunet_options() if nnunet is not None else None,
                         output=parse_output(self.get("output")), activation=self.get("activation") or "auto",
                         preprocessing=self.preprocessing() if "spacing" in self else None,
                         inferer=self.inferer() if "roi_size" in self else None, flip_axes=self.flips(),
                         device=self.get("device"), eval=self.get("eval") or "auto",
                         amp=bool(self.get("amp", False))).check()

    def flips(self) -> list[int] | None:
        """``--flip-axes`` as axis numbers (None when not given)."""
        try:
            return [int(a) for a in split_list(self.get("flip_axes"))] or None
        except ValueError:
            raise typer.BadParameter(f"must be axis numbers separated by commas, got {self['flip_axes']!r}",
                                     param_hint="--flip-axes") from None

    def models(self, name: str = "model"):
        """``--model`` (or ``--weights``) as the library takes it: None, one value, or a list (an ensemble)."""
        values = list(self.get(name) or [])
        return None if not values else values[0] if len(values) == 1 else values


def parse_output(value: str | None):
    """``--output``: a tuple index (``0``, ``-1``) or a dict key; ``None`` for the default."""
    if value is None or not str(value).strip():
        return None
    try:
        return int(value)
    except ValueError:
        return str(value).strip()


def split_list(value: str | None) -> list[str]:
    """A comma-separated option as a list of its non-empty, stripped items."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def takes(*names: str):
    """Decorate a command (below ``@app.command``) whose last parameter is ``flags``: Typer then sees the
    command's own parameters followed by the shared options ``names`` (and their hidden old spellings), and
    the command is called with those packed into ``flags`` (a :class:`Flags`). Typer reads a command's
    ``__signature__`` and type hints, which are rewritten here."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise KeyError(f"undeclared options {unknown}")

    def deco(command):
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "flags"]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{command.__name__} declares shared options itself: {sorted(clash)}")
        aliases = {f"{n}__{a.strip('-').replace('-', '_')}": (n, a) for n in names for a in OPTIONS[n].aliases}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=OPTIONS[n].option(),
                                   annotation=OPTIONS[n].type) for n in names]
        extra += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=OPTIONS[n].alias_option(a),
                                    annotation=Optional[str]) for k, (n, a) in aliases.items()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            flags = Flags({n: kwargs.pop(n) for n in names})
            for k, (n, a) in aliases.items():
                v = kwargs.pop(k)
                if v is not None:
                    if flags[n] not in (None, OPTIONS[n].default):
                        raise typer.BadParameter(f"given twice (also as {a})", param_hint=OPTIONS[n].decls[0])
                    flags[n] = v
            return command(**kwargs, flags=flags)

        wrapper.__signature__ = inspect.Signature(own + extra)
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "flags"},
                                   **{n: OPTIONS[n].type for n in names}, **{k: Optional[str] for k in aliases}}
        wrapper.shared_options = names
        return wrapper
    return deco


__all__ = ["DICOM_OUTPUT", "EXPLAIN", "FORMAT_OUTPUT",
           "Flags", "declared_methods", "MODEL_INPUT", "OPTIONS", "Opt", "split_list", "takes"]
