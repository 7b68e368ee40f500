"""The run-time side of the DICOM-output and PACS options (``--format``, ``--dicom-reference``,
``--dicom-threshold``, ``--pacs``, ``--study``, ``--pacs-netrc``, ``--pacs-ca-bundle``; declared with the other
shared options in :mod:`medexplain.cli.params`, ``DICOM_OUTPUT``): the PACS they name and the pipeline's keyword
arguments (issue 24, ``docs/dicom.md``). Credentials are never flags: they come from the environment or a netrc
file (:func:`medexplain.io.pacs.pacs_session`)."""
from __future__ import annotations

from medexplain.cli.params import Flags


def pacs_of(flags: Flags):
    """The :class:`medexplain.io.pacs.Pacs` of ``--pacs`` (None without; call inside ``cli_errors``)."""
    from medexplain.errors import OptionError

    if flags.pacs is None:
        if flags.study is not None:
            raise OptionError("--study is for --pacs; give the PACS URL too")
        return None
    if flags.study is None:
        raise OptionError("--pacs needs --study UID (and --series UID when the study has several series)")
    from medexplain.io.pacs import Pacs
    return Pacs(flags.pacs, netrc=flags.pacs_netrc, ca_bundle=flags.pacs_ca_bundle)


def output_kwargs(flags: Flags) -> dict:
    """``formats``, ``dicom_reference`` and ``dicom_threshold`` of :func:`medexplain.pipelines.explain_image`
    (the same keywords of :func:`medexplain.pipelines.run.run_manifest` and
    :func:`medexplain.pipelines.explain_lesion_instances`); the threshold as a number where it is one."""
    t = flags.dicom_threshold
    try:
        t = float(t)
    except ValueError:
        pass
    return {"formats": flags.format, "dicom_reference": flags.dicom_reference, "dicom_threshold": t}
