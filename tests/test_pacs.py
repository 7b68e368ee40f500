"""A PACS as source and destination (issue 24), against a real Orthanc with DICOMweb (tests/pacs_fixture.py).

The round trip uploads a series through Orthanc's REST API, runs ``medexplain explain --pacs ... --study ...``
(credentials from the environment), then asks Orthanc itself: the new series are in the same study, the PM
and SEG on the source's Frame of Reference, every referenced SOP instance exists on the server, and
Orthanc's own rendering of the Secondary Capture equals the PNG figure. Refusals (401, an unknown study, a
server that is down, a study with several series) are one clear error naming the URL, with nothing written.
"""
import io as bytesio
import socket

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.errors import InputError
from medexplain.io.pacs import Pacs, PacsError, pacs_session
from pacs_fixture import PASSWORD, USER
from test_dicom import write_series

runner = CliRunner()
SOP = {"MR": "1.2.840.10008.5.1.4.1.1.4", "PM": "1.2.840.10008.5.1.4.1.1.30", "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
       "SC": "1.2.840.10008.5.1.4.1.1.7"}


def _env(user=USER, password=PASSWORD):
    return {"MEDEXPLAIN_PACS_USER": user, "MEDEXPLAIN_PACS_PASSWORD": password, "MEDEXPLAIN_PACS_TOKEN": ""}


def _upload_series(orthanc, folder):
    for f in sorted(folder.iterdir()):
        orthanc.upload(f)
    return pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)


def _lookup(orthanc, uid):
    import requests
    r = requests.post(orthanc.rest + "/tools/lookup", data=uid, auth=orthanc.auth, timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.mark.slow
def test_round_trip_through_orthanc(orthanc, tmp_path, one_thread):
    src = _upload_series(orthanc, (tmp_path / "knee", write_series(tmp_path / "knee"))[0])
    study = str(src.StudyInstanceUID)
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", "--pacs", orthanc.dicomweb, "--study", study, "--model", "test_dicom:one_voxel",
                              "--method", "saliency", "--format", "png,dicom", "--out", str(out)], env=_env())
    assert res.exit_code == 0, res.output
    assert "stored 3 DICOM object(s)" in " ".join(res.output.split())
    study_id = _lookup(orthanc, study)[0]["ID"]
    series = orthanc.get(f"/studies/{study_id}/series").json()
    assert len(series) == 4                                  # the source and the PM, SEG and SC
    by_class = {}
    for s in series:
        inst = orthanc.get(f"/series/{s['ID']}/instances").json()[0]
        tags = orthanc.get(f"/instances/{inst['ID']}/tags", params={"simplify": ""}).json()
        by_class[tags["SOPClassUID"]] = (inst["ID"], tags)
    assert set(by_class) == {SOP["MR"], SOP["PM"], SOP["SEG"], SOP["SC"]}
    for kind in ("PM", "SEG", "SC"):
        tags = by_class[SOP[kind]][1]
        assert tags["StudyInstanceUID"] == study and tags["SeriesInstanceUID"] != str(src.SeriesInstanceUID)
        if kind != "SC":
            assert tags["FrameOfReferenceUID"] == str(src.FrameOfReferenceUID)
    # a second run on the study still finds the one image series (the stored objects are not counted)
    assert Pacs(orthanc.dicomweb, env=_env()).choose_series(study) == str(src.SeriesInstanceUID)
    # every SOP instance the objects reference exists on the PACS (and is the source series')
    for p in sorted(out.glob("*.dcm")):
        obj = pydicom.dcmread(str(p))
        refs = {str(i.ReferencedSOPInstanceUID) for s in obj.get("ReferencedSeriesSequence", [])
                for i in s.ReferencedInstanceSequence} | {str(i.ReferencedSOPInstanceUID)
                                                          for i in obj.get("SourceImageSequence", [])}
        assert refs
        for uid in refs:
            found = _lookup(orthanc, uid)
            assert found and found[0]["Type"] == "Instance", uid
    # Orthanc's own rendering of the Secondary Capture = the PNG figure (+ the banner under it)
    sc_id = by_class[SOP["SC"]][0]
    preview = np.asarray(Image.open(bytesio.BytesIO(orthanc.get(f"/instances/{sc_id}/preview").content))
                         .convert("RGB")).astype(float)
    png = np.asarray(Image.open(next(out.glob("*_saliency.png"))).convert("RGB")).astype(float)
    assert preview.shape[1] == png.shape[1] and preview.shape[0] > png.shape[0]
    assert np.abs(preview[:png.shape[0]] - png).mean() / 255 < 2 / 255


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["401", "404", "down"])
def test_refusals_are_one_clear_error_and_nothing_is_written(orthanc, tmp_path, case):
    url, env, study = orthanc.dicomweb, _env(), "1.2.3.4.5.6.7.8.9"
    if case == "401":
        env = _env(password="wrong")
    if case == "down":
        url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
    res = runner.invoke(app, ["explain", "--pacs", url, "--study", study, "--model", "test_dicom:one_voxel",
                              "--format", "dicom", "--out", str(tmp_path / "out")], env=env)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and url in text, text
    assert {"401": "HTTP 401", "404": "not found", "down": "cannot be reached"}[case] in text
    assert not (tmp_path / "out").exists()


def test_a_study_with_several_series_lists_them(orthanc, tmp_path):
    first = _upload_series(orthanc, (tmp_path / "a", write_series(tmp_path / "a", description="T1"))[0])
    write_series(tmp_path / "b", seed=1, description="T2")
    for f in sorted((tmp_path / "b").iterdir()):            # the second series into the first one's study
        ds = pydicom.dcmread(str(f))
        ds.StudyInstanceUID = first.StudyInstanceUID
        ds.save_as(str(f))
        orthanc.upload(f)
    pacs = Pacs(orthanc.dicomweb, env=_env())
    with pytest.raises(InputError, match="has 2 image series; choose one with --series") as e:
        pacs.choose_series(str(first.StudyInstanceUID))
    assert str(first.SeriesInstanceUID) in str(e.value) and "T2" in str(e.value)
    assert pacs.choose_series(str(first.StudyInstanceUID), str(first.SeriesInstanceUID)) == str(first.SeriesInstanceUID)
    with pytest.raises(InputError, match="has no series 1.2.3"):
        pacs.choose_series(str(first.StudyInstanceUID), "1.2.3")


def test_credentials_come_from_the_environment_or_netrc_never_a_flag(tmp_path):
    s, how = pacs_session("https://pacs.example/dicom-web", env={"MEDEXPLAIN_PACS_TOKEN": "s3cr3t-t0k"})
    assert s.headers["Authorization"] == "Bearer s3cr3t-t0k" and "bearer" in how and "s3cr3t" not in how and s.verify is True
    (tmp_path / "pw").write_text("secret\n")
    s, how = pacs_session("https://pacs.example/dicom-web",
                          env={"MEDEXPLAIN_PACS_USER": "u", "MEDEXPLAIN_PACS_PASSWORD_FILE": str(tmp_path / "pw")})
    assert s.auth == ("u", "secret") and "secret" not in how
    (tmp_path / "netrc").write_text("machine pacs.example login nu password np\n")
    s, how = pacs_session("https://pacs.example/dicom-web", netrc=tmp_path / "netrc", env={}, ca_bundle="/ca.pem")
    assert s.auth == ("nu", "np") and "netrc" in how and s.verify == "/ca.pem"
    with pytest.raises(InputError, match="MEDEXPLAIN_PACS_PASSWORD"):
        pacs_session("https://pacs.example", env={"MEDEXPLAIN_PACS_USER": "u"})
    with pytest.raises(InputError, match="http"):
        Pacs("ftp://pacs.example", env={})
    res = runner.invoke(app, ["explain", "--help"])
    assert "--pacs" in res.output and "password" not in res.output.lower().replace("medexplain_pacs_password", "")


def test_pacs_error_is_a_typed_error():
    from medexplain.errors import MedexplainError
    assert issubclass(PacsError, MedexplainError)


def test_image_or_pacs_and_study_flags_are_checked(tmp_path):
    cases = [([], "give the IMAGE file(s), or --pacs URL --study UID"),
             (["--pacs", "http://127.0.0.1:9/dicom-web"], "--pacs needs --study UID"),
             (["--study", "1.2.3", "scan.nii.gz"], "--study is for --pacs"),
             (["--pacs", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3", "scan.nii.gz"], "not both")]
    for args, message in cases:
        res = runner.invoke(app, ["explain", "--model", "test_dicom:one_voxel", "--out", str(tmp_path / "o"), *args],
                            env=_env())
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
    assert not (tmp_path / "o").exists()


def _series_of_study(orthanc, study) -> dict:
    """SOP Class UID -> (Frame of Reference UID, instance count) of every series in ``study``, from Orthanc's REST API."""
    found = _lookup(orthanc, study)
    if not found:
        return {}
    out = {}
    for s in orthanc.get(f"/studies/{found[0]['ID']}/series").json():
        inst = orthanc.get(f"/series/{s['ID']}/instances").json()
        tags = orthanc.get(f"/instances/{inst[0]['ID']}/tags", params={"simplify": ""}).json()
        out[tags["SOPClassUID"]] = (tags.get("FrameOfReferenceUID"), len(inst))
    return out


@pytest.mark.slow
def test_run_explains_pacs_studies_and_stores_the_objects_back(orthanc, tmp_path, one_thread, monkeypatch):
    """``run --pacs``: a manifest of two Study UIDs and one the PACS does not have. Each study is retrieved,
    explained and its objects stored back into it; the unknown study and a store that fails are error rows
    (marked transient) while the other case completes; ``--resume`` retries exactly those rows."""
    from medexplain.io.pacs import Pacs as PacsClass
    from medexplain.pipelines.run import run_manifest

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    src = {name: _upload_series(orthanc, (tmp_path / name, write_series(tmp_path / name, seed=seed))[0])
           for name, seed in (("a", 0), ("b", 1))}
    missing = "1.2.826.0.1.3680043.8.498.999"
    (tmp_path / "cases.csv").write_text(f"case_id,study\na,{src['a'].StudyInstanceUID}\nmissing,{missing}\n"
                                        f"b,{src['b'].StudyInstanceUID}\n")
    store = PacsClass.store

    def failing_store(self, paths):   # the PACS refuses to store case b's objects (this call only)
        if any("/b/" in str(p) for p in paths):
            raise PacsError(f"PACS {self.url}: storing 3 object(s) failed: HTTP 503 Service Unavailable")
        return store(self, paths)

    monkeypatch.setattr(PacsClass, "store", failing_store)
    kw = dict(pacs=orthanc.dicomweb, formats="png")
    res = run_manifest(tmp_path / "cases.csv", "test_dicom:one_voxel", "saliency", tmp_path / "run", **kw)
    rows = {r["case_id"]: r for r in res.rows}
    assert rows["a"]["status"] == "ok" and rows["missing"]["status"] == "error" and rows["b"]["status"] == "error"
    assert orthanc.dicomweb in rows["missing"]["error"] and "not found" in rows["missing"]["error"]
    assert rows["missing"]["error"].startswith("pacs:") and rows["b"]["error"].startswith("store:")
    # case a: its objects in its folder and in its study, on its Frame of Reference
    folder = tmp_path / "run" / "cases" / "a"
    assert sorted(p.name for p in folder.glob("saliency*")) == ["saliency.json", "saliency.nii.gz", "saliency.png",
                                                                "saliency_pm.dcm", "saliency_sc.dcm", "saliency_seg.dcm"]
    on_pacs = _series_of_study(orthanc, str(src["a"].StudyInstanceUID))
    assert set(on_pacs) == {SOP["MR"], SOP["PM"], SOP["SEG"], SOP["SC"]}
    for kind in ("PM", "SEG"):
        assert on_pacs[SOP[kind]][0] == str(src["a"].FrameOfReferenceUID)
    stored = pydicom.dcmread(str(folder / "saliency_pm.dcm"))
    assert stored.StudyInstanceUID == src["a"].StudyInstanceUID and stored.PatientID == src["a"].PatientID
    assert set(_series_of_study(orthanc, str(src["b"].StudyInstanceUID))) == {SOP["MR"]}   # nothing stored for b
    # the PACS recovers, and the missing study arrives: --resume redoes the two error rows only
    monkeypatch.setattr(PacsClass, "store", store)
    write_series(tmp_path / "late", seed=2)
    for f in sorted((tmp_path / "late").iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.StudyInstanceUID = missing
        ds.save_as(str(f))
        orthanc.upload(f)
    res = runner.invoke(app, ["run", str(tmp_path / "cases.csv"), "--model", "test_dicom:one_voxel", "--method",
                              "saliency", "--pacs", orthanc.dicomweb, "--format", "png", "--out", str(tmp_path / "run"),
                              "--resume"], env=_env())
    assert res.exit_code == 0, res.output
    assert "3 item(s): 3 ok, 0 errors; computed 2, already complete 1" in " ".join(res.output.split())
    for study in (str(src["b"].StudyInstanceUID), missing):
        assert set(_series_of_study(orthanc, study)) == {SOP["MR"], SOP["PM"], SOP["SEG"], SOP["SC"]}
    assert _series_of_study(orthanc, str(src["a"].StudyInstanceUID))[SOP["PM"]][1] == 1   # a was not redone
