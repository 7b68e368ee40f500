"""A PACS as the source and the destination of explanations: DICOMweb through ``dicomweb-client``
(issue 24; ``docs/dicom.md``).

:class:`Pacs` reads a series of a study (QIDO-RS to list the study's series, WADO-RS to retrieve the
instances into a folder) and stores DICOM objects back (STOW-RS). :func:`explain_pacs` is ``medexplain
explain --pacs URL --study UID [--series UID]``: it lists the study's series first (several: an error that
lists them, choose with ``--series``), checks the output folder, retrieves the series into a temporary
folder, explains it with :func:`medexplain.pipelines.explain_image` (``dicom`` added to the formats) and
stores the DICOM objects back into the study.

Authentication, never on the command line (:func:`pacs_session`), first found wins:

- a bearer token in the environment variable ``MEDEXPLAIN_PACS_TOKEN`` (or a file named by
  ``MEDEXPLAIN_PACS_TOKEN_FILE``);
- HTTP basic with ``MEDEXPLAIN_PACS_USER`` and ``MEDEXPLAIN_PACS_PASSWORD`` (or a password file named by
  ``MEDEXPLAIN_PACS_PASSWORD_FILE``);
- HTTP basic from a netrc entry for the PACS host (``~/.netrc``, or the file ``netrc`` names).

TLS certificates are verified (``ca_bundle``: a CA file for a hospital's own authority); there is no
switch to turn verification off. A PACS that is unreachable, refuses the credentials (401/403) or does not
have the study (404) is a :class:`PacsError` naming the URL and the HTTP status, raised before anything is
computed or written.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from medexplain.errors import InputError, MedexplainError

__all__ = ["PacsError", "Pacs", "pacs_session", "explain_pacs", "fetch_case", "TOKEN_ENV", "USER_ENV", "PASSWORD_ENV"]

TOKEN_ENV, TOKEN_FILE_ENV = "MEDEXPLAIN_PACS_TOKEN", "MEDEXPLAIN_PACS_TOKEN_FILE"
USER_ENV, PASSWORD_ENV, PASSWORD_FILE_ENV = "MEDEXPLAIN_PACS_USER", "MEDEXPLAIN_PACS_PASSWORD", "MEDEXPLAIN_PACS_PASSWORD_FILE"


class PacsError(MedexplainError, ConnectionError):
    """The PACS is unreachable, refuses the request, or does not have what was asked for."""


def _read_secret(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise InputError(f"cannot read the {what} file {path}: {e.strerror}") from None


def pacs_session(url: str, *, netrc: str | os.PathLike | None = None, ca_bundle: str | os.PathLike | None = None,
                 env=None):
    """A ``requests.Session`` for the PACS at ``url`` with the credentials of the environment (``env``,
    default ``os.environ``; see the module text) and TLS verification on (``ca_bundle``: the CA file).
    Returns ``(session, how)`` where ``how`` names the authentication used (never the secret)."""
    import netrc as netrc_mod

    import requests

    env = os.environ if env is None else env
    s = requests.Session()
    s.trust_env = False        # no implicit ~/.netrc or proxy credentials: the rules above only
    s.verify = str(ca_bundle) if ca_bundle else True
    token = env.get(TOKEN_ENV) or (_read_secret(env[TOKEN_FILE_ENV], "token") if env.get(TOKEN_FILE_ENV) else None)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
        return s, f"bearer token ({TOKEN_ENV if env.get(TOKEN_ENV) else TOKEN_FILE_ENV})"
    user = env.get(USER_ENV)
    if user:
        pw = env.get(PASSWORD_ENV) or (_read_secret(env[PASSWORD_FILE_ENV], "password")
                                       if env.get(PASSWORD_FILE_ENV) else None)
        if pw is None:
            raise InputError(f"{USER_ENV} is set but neither {PASSWORD_ENV} nor {PASSWORD_FILE_ENV}")
        s.auth = (user, pw)
        return s, f"HTTP basic ({USER_ENV})"
    host = urlparse(url).hostname or ""
    path = Path(netrc) if netrc else Path(env.get("NETRC", Path.home() / ".netrc"))
    if path.is_file():
        try:
            entry = netrc_mod.netrc(str(path)).authenticators(host)
        except (netrc_mod.NetrcParseError, OSError) as e:
            raise InputError(f"cannot read the netrc file {path}: {e}") from None
        if entry:
            s.auth = (entry[0], entry[2])
            return s, f"HTTP basic (netrc {path}, machine {host})"
    elif netrc:
        raise InputError(f"the netrc file {path} does not exist")
    return s, "none"


@dataclass
class Pacs:
    """A DICOMweb PACS: ``url`` the DICOMweb root (Orthanc: ``http://host:8042/dicom-web``); ``netrc``,
    ``ca_bundle`` and ``env`` as :func:`pacs_session`; each request is tried up to ``attempts`` times."""

    url: str
    netrc: str | None = None
    ca_bundle: str | None = None
    env: dict | None = None
    attempts: int = 3
    auth: str = field(init=False, default="none")

    def __post_init__(self):
        scheme = urlparse(self.url).scheme
        if scheme not in ("http", "https"):
            raise InputError(f"--pacs must be an http(s) DICOMweb URL, got {self.url!r}")
        from dicomweb_client.api import DICOMwebClient

        session, self.auth = pacs_session(self.url, netrc=self.netrc, ca_bundle=self.ca_bundle, env=self.env)
        self.client = DICOMwebClient(url=self.url.rstrip("/"), session=session)
        # dicomweb-client retries every failed request (also a refused connection) 5 times over 30 s; a PACS
        # that is down is reported after ``attempts`` tries, 0.5 s, 1 s, ... apart
        self.client.set_http_retry_params(retry=True, max_attempts=self.attempts, wait_exponential_multiplier=250)

    def _call(self, what: str, fn, *args, **kw):
        """``fn(*args, **kw)`` with the HTTP and connection errors as one :class:`PacsError` line."""
        import requests

        try:
            return fn(*args, **kw)
        except requests.exceptions.HTTPError as e:
            r = e.response
            code = r.status_code if r is not None else "?"
            hint = {401: f" (authentication refused; credentials used: {self.auth}; see docs/dicom.md)",
                    403: f" (not allowed for these credentials: {self.auth})",
                    404: " (not found on this PACS)"}.get(code, "")
            raise PacsError(f"PACS {self.url}: {what} failed: HTTP {code} {getattr(r, 'reason', '')}{hint}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise PacsError(f"PACS {self.url}: {what} failed: the server cannot be reached "
                            f"({type(e).__name__})") from None
        except requests.exceptions.RequestException as e:
            raise PacsError(f"PACS {self.url}: {what} failed: {type(e).__name__}: {e}") from None

    def series(self, study: str) -> list[dict]:
        """The series of ``study`` (QIDO-RS): ``[{"uid", "modality", "number", "description", "instances"}]``."""
        found = self._call(f"listing the series of study {study}", self.client.search_for_series,
                           study_instance_uid=study,
                           fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesNumber", "Modality"])

        def val(d, tag):
            v = d.get(tag, {}).get("Value", [None])
            return v[0] if v else None
        out = [{"uid": val(d, "0020000E"), "modality": val(d, "00080060"), "number": val(d, "00200011"),
                "description": val(d, "0008103E"), "instances": val(d, "00201209")} for d in found]
        if not out:
            raise PacsError(f"PACS {self.url}: study {study} not found (no series)")
        return out

    def choose_series(self, study: str, series: str | None = None) -> str:
        """The one series to explain: ``series`` (checked to be in the study), or the study's only image
        series; several: an :class:`InputError` listing them (choose with ``--series``). Segmentations and
        medexplain's own earlier objects (series descriptions starting ``PM `` or ``SC ``) are not counted."""
        found = self.series(study)
        if series is not None:
            if series not in {s["uid"] for s in found}:
                raise InputError(f"PACS {self.url}: study {study} has no series {series}; it has: {_listing(found)}")
            return series
        images = [s for s in found if s["modality"] != "SEG"
                  and not str(s["description"] or "").startswith(("PM ", "SC "))]
        if len(images) != 1:
            raise InputError(f"PACS {self.url}: study {study} has {len(images)} image series; choose one with --series "
                             f"UID: {_listing(found)}")
        return images[0]["uid"]

    def download(self, study: str, series: str, folder) -> Path:
        """The instances of ``series`` (WADO-RS) written as ``<SOPInstanceUID>.dcm`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        instances = self._call(f"retrieving series {series}", self.client.retrieve_series, study, series)
        if not instances:
            raise PacsError(f"PACS {self.url}: series {series} of study {study} has no instances")
        for ds in instances:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return folder

    def store(self, paths) -> list[str]:
        """STOW-RS of the DICOM files ``paths`` (into the study each names); returns their SOP Instance UIDs."""
        import pydicom

        dss = [pydicom.dcmread(str(p)) for p in paths]
        if dss:
            self._call(f"storing {len(dss)} object(s)", self.client.store_instances, dss)
        return [str(d.SOPInstanceUID) for d in dss]


def _listing(found: list[dict]) -> str:
    return "; ".join(f"{s['uid']} ({s['modality'] or '?'} #{s['number'] or '?'} {s['description'] or ''}, "
                     f"{s['instances'] or '?'} instance(s))".replace(" ,", ",") for s in found)


def fetch_case(pacs: Pacs, study: str, series: str | None, folder) -> tuple[Path, str]:
    """For a run worker: the chosen series of ``study`` retrieved into ``folder/<SeriesInstanceUID>``;
    returns ``(series folder, series UID)`` (its name is the series UID, so outputs are named by it)."""
    uid = pacs.choose_series(study, series)
    return pacs.download(study, uid, Path(folder) / uid), uid


def explain_pacs(pacs: Pacs, study: str, model, methods, out, *, series: str | None = None, formats=None,
                 overwrite: bool = False, store: bool = True, **kwargs):
    """:func:`medexplain.pipelines.explain_image` of a series of ``study`` on ``pacs`` with ``model`` (a Model, an
    ``nn.Module``, an :class:`mx.ModelSpec <medexplain.models.spec.ModelSpec>`, or anything ``mx.load_model``
    takes: :func:`medexplain.pipelines.case_model`), its DICOM objects stored back into the study (``store``). The
    model's contradictions (:meth:`~medexplain.models.spec.ModelSpec.check`), the study's series and the output
    folder are checked before the series is retrieved (into a temporary folder, removed at the end) and before
    any compute; ``dicom`` is added to ``formats``. The outputs are named by the SeriesInstanceUID. Returns the
    :class:`~medexplain.pipelines.ExplainedImage`; its ``stored`` attribute lists the SOP Instance UIDs sent."""
    from medexplain import io
    from medexplain.engine.registry import get_method
    from medexplain.errors import PartialFailure
    from medexplain.io.dicom import parse_formats
    from medexplain.models.spec import ModelSpec
    from medexplain.pipelines import _check_outputs, explain_image
    if isinstance(model, ModelSpec):
        model.check()   # contradicting sources, before the PACS is asked for anything
    formats = tuple(dict.fromkeys(parse_formats(formats) + ("dicom",)))
    names = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    names = [get_method(m).name for m in names]
    uid = pacs.choose_series(study, series)
    io.check_output_dir(out)
    _check_outputs(uid, names, Path(out), overwrite, formats, kwargs.get("report", False))
    with tempfile.TemporaryDirectory(prefix="medexplain-pacs-") as tmp:
        folder = pacs.download(study, uid, Path(tmp) / uid)
        try:
            res = explain_image(folder, model, names, out, formats=formats, overwrite=overwrite, series=uid, **kwargs)
        except PartialFailure as e:   # the finished methods' objects still go to the PACS
            res = e.result
            res.stored = pacs.store([p for p in res.files if str(p).endswith(".dcm")]) if store else []
            raise
    res.stored = pacs.store([p for p in res.files if str(p).endswith(".dcm")]) if store else []
    return res
