"""The output-format and PACS flags (``--format``, ``--dicom-reference``, ``--dicom-threshold``, ``--pacs``,
``--study``, ``--pacs-netrc``, ``--pacs-ca-bundle``), declared once: :func:`output_format_options` gives them to a
command in one line, packed into ``outputs: OutputOptions`` (issue 24, ``docs/dicom.md``). Credentials are
never flags: they come from the environment or a netrc file (:func:`medexplain.pacs.pacs_session`)."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

FORMAT_HELP = ("outputs, comma-separated: nifti (maps on the input's affine), png (figures), dicom (a Parametric Map, a "
               "Segmentation and a Secondary Capture per map in the source study; docs/dicom.md)")

#: (parameter, type, option factory)
OUTPUT_FLAGS = (
    ("format", str, lambda: typer.Option("nifti,png", "--format", help=FORMAT_HELP)),
    ("dicom_reference", Optional[Path], lambda: typer.Option(
        None, "--dicom-reference", help="with --format dicom and a NIfTI/PNG input: the DICOM series (folder or file) "
        "it was made from, whose study and frame of reference the objects join (the map is resampled onto it)")),
    ("dicom_threshold", str, lambda: typer.Option(
        "otsu", "--dicom-threshold", help="the SEG's binarisation, as the metrics: otsu (CheXlocalize's), otsu_float, "
        "or a number in [0, 1] on the min-max normalised map")),
    ("pacs", Optional[str], lambda: typer.Option(
        None, "--pacs", help="a DICOMweb URL (e.g. https://pacs/dicom-web): read --study [--series] from it and store "
        "the DICOM objects back; credentials from MEDEXPLAIN_PACS_TOKEN, MEDEXPLAIN_PACS_USER + MEDEXPLAIN_PACS_PASSWORD "
        "(or *_FILE) or a netrc entry, never a flag")),
    ("study", Optional[str], lambda: typer.Option(None, "--study", help="with --pacs: the StudyInstanceUID")),
    ("pacs_netrc", Optional[Path], lambda: typer.Option(None, "--pacs-netrc", help="with --pacs: a netrc file holding "
                                                        "the PACS host's login (default ~/.netrc)")),
    ("pacs_ca_bundle", Optional[Path], lambda: typer.Option(None, "--pacs-ca-bundle", help="with --pacs: the CA "
                                                            "certificates to verify the PACS's TLS certificate with")),
)


@dataclass(frozen=True)
class OutputOptions:
    """The :data:`OUTPUT_FLAGS` of one call."""

    flags: dict

    @property
    def pacs(self):
        """The :class:`medexplain.pacs.Pacs` of ``--pacs`` (None without; call inside ``cli_errors``)."""
        from ..errors import OptionError
        f = self.flags
        if f["pacs"] is None:
            if f["study"] is not None:
                raise OptionError("--study is for --pacs; give the PACS URL too")
            return None
        if f["study"] is None:
            raise OptionError("--pacs needs --study UID (and --series UID when the study has several series)")
        from ..pacs import Pacs
        return Pacs(f["pacs"], netrc=f["pacs_netrc"], ca_bundle=f["pacs_ca_bundle"])

    def pipeline_kwargs(self) -> dict:
        f = self.flags
        t = f["dicom_threshold"]
        try:
            t = float(t)
        except ValueError:
            pass
        return {"formats": f["format"], "dicom_reference": f["dicom_reference"], "dicom_threshold": t}


def output_format_options(command):
    """Decorate a command (below ``@app.command``) taking ``outputs: OutputOptions`` with the
    :data:`OUTPUT_FLAGS` (as :func:`medexplain.cli._common.model_input_options` does for the model-input flags)."""
    sig = inspect.signature(command)
    own = [p for p in sig.parameters.values() if p.name != "outputs"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=make(), annotation=t)
             for n, t, make in OUTPUT_FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = {n: kwargs.pop(n) for n, _, _ in OUTPUT_FLAGS}
        return command(**kwargs, outputs=OutputOptions(flags))

    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {**{k: v for k, v in getattr(command, "__annotations__", {}).items() if k != "outputs"},
                               **{n: t for n, t, _ in OUTPUT_FLAGS}}
    return wrapper
