"""Dataset-scale runs (issue 9): outputs, crash safety and resume, error rows, the Ray backend."""
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medexplain as mx
from conftest import TinyClassifier
from medexplain.engine.explain import accepted_options
from medexplain.pipelines.run import RunStore, read_manifest, read_table, run_manifest
from medexplain.pipelines.run.store import TABLE_CSV

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
METHODS = ["saliency", "integrated_gradients", "occlusion"]
OPTIONS = {"steps": 4, "window": 4}


def tiny2d():
    """A 1-channel 2D classifier (module:factory form for the run)."""
    torch.manual_seed(0)
    return TinyClassifier(2, cin=1).eval()


def tiny3d():
    """A 1-channel 3D classifier with hooks (module:factory form: worker processes import it)."""
    torch.manual_seed(0)
    return TinyClassifier(3, cin=1).eval()


def tiny3d_if_marked():
    """tiny3d, built only where MEDEXPLAIN_TEST_MARK is set (a worker must be given the run's environment)."""
    if os.environ.get("MEDEXPLAIN_TEST_MARK") != "run":
        raise RuntimeError("MEDEXPLAIN_TEST_MARK is not set in this process")
    return tiny3d()


def tiny3d_not_in_workers():
    """tiny3d in the run's process; in a worker process, a factory that raises."""
    if multiprocessing.parent_process() is not None:
        raise RuntimeError("no model in worker processes")
    return tiny3d()


def scripted3d(tmp: Path) -> str:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyClassifier(3, cin=1).eval()), tmp / "model.pt")
    return str(tmp / "model.pt")


def volumes(tmp: Path, n: int = 6, size: int = 8, extra_rows=()) -> Path:
    """n NIfTI volumes with masks (the last one empty), labels, targets every other row, then extra rows."""
    rng = np.random.default_rng(0)
    rows = ["image,mask,label,target"]
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.random((size,) * 3).astype(np.float32), AFFINE), str(tmp / f"v{i}.nii.gz"))
        m = np.zeros((size,) * 3, np.uint8)
        if i < n - 1:
            m[1 + i % 3:4 + i % 3, 2:5, 3:6] = 1
        nib.save(nib.Nifti1Image(m, AFFINE), str(tmp / f"m{i}.nii.gz"))
        rows.append(f"v{i}.nii.gz,m{i}.nii.gz,{i % 3},{'' if i % 2 else i % 3}")
    rows += list(extra_rows)
    (tmp / "cases.csv").write_text("\n".join(rows) + "\n")
    return tmp / "cases.csv"


def comparable(rows):
    """Rows without the timing column (the only one that depends on the machine's speed)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def outputs(out: Path) -> dict:
    """Every final file of a run except run.json, as bytes (records without their timing)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "run.json" and not p.name.endswith(".parquet"):
            rel = str(p.relative_to(out))
            if p.suffix == ".json":
                files[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            elif p.name == TABLE_CSV:
                files[rel] = comparable(read_table(p))
            else:
                files[rel] = p.read_bytes()
    return files


def test_manifest_resolves_paths_and_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub" / "m.csv"
    csv.write_text("Image;Target;label;case_id\nscan.nii.gz;2;1;\n/abs/x.png;;;patient 7\n")
    a, b = read_manifest(csv)
    assert a.image == str(tmp_path / "sub" / "scan.nii.gz") and a.target == 2 and a.label == 1
    assert a.case_id == "00000_scan" and b.case_id == "patient 7" and b.target is None and b.image == "/abs/x.png"


def test_run_writes_maps_metrics_table_and_record(tmp_path):
    (tmp_path / "nan.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.full((8,) * 3, np.nan, np.float32), AFFINE), str(tmp_path / "nan.nii.gz"))
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    csv = volumes(tmp_path, extra_rows=["missing.nii.gz,,0,", "nan.nii.gz,,0,", "corrupt.nii.gz,,0,"])
    model = scripted3d(tmp_path)
    res = run_manifest(csv, model, METHODS, tmp_path / "out", options=OPTIONS, batch_size=2)
    rows = res.rows
    assert len(rows) == 9 * 3 and res.n_ok == 6 * 3 and res.n_error == 3 * 3
    # The table on disk (CSV and Parquet) holds the rows, in manifest then method order.
    csv_rows = read_table(res.out / "results.csv")
    assert [(r["case_id"], r["method"]) for r in csv_rows] == [(r["case_id"], r["method"]) for r in rows]
    pq = pytest.importorskip("pyarrow.parquet").read_table(res.out / "results.parquet").to_pylist()
    assert comparable(pq) == comparable(csv_rows)
    err = {r["case_id"].split("_", 1)[1]: r["error"] for r in csv_rows if r["status"] == "error"}
    assert "no such file" in err["missing"] and "NaN" in err["nan"] and "cannot read as nifti" in err["corrupt"]

    net = torch.jit.load(model)
    cases = read_manifest(csv)[:6]
    xs = torch.cat([torch.from_numpy(np.asarray(nib.load(c.image).dataobj))[None, None] for c in cases])
    preds = net(xs).argmax(1).tolist()
    targets = [c.target if c.target is not None else p for c, p in zip(cases, preds)]
    by_item = {(r["index"], r["method"]): r for r in csv_rows}
    for start in (0, 2, 4):  # the chunks of batch_size 2: each case's map is mx.explain on that case alone
        for m in METHODS:
            opts = {k: v for k, v in OPTIONS.items() if k in accepted_options(m)}
            want = torch.cat([mx.explain(net, xs[i:i + 1], m, target=targets[i], **opts).map
                              for i in (start, start + 1)])
            for j in (0, 1):
                case, r = cases[start + j], by_item[(start + j, m)]
                assert r["predicted"] == preds[start + j] and r["target"] == targets[start + j]
                assert r["target_source"] == ("manifest" if case.target is not None else "predicted")
                img = nib.load(str(res.out / r["map"]))
                assert np.allclose(img.affine, AFFINE) and img.shape == (8, 8, 8)
                amap = torch.from_numpy(np.asarray(img.dataobj))[None, None]
                assert torch.equal(amap[0], want[j])
                # the hit rate is the pointing game on the saved map; empty (NaN) for the empty mask
                mask = torch.from_numpy(np.asarray(nib.load(case.mask).dataobj) > 0)[None]
                hit = float(mx.metrics.hit_rate(amap, mask)[0])
                assert (r["hit_rate"] is None and np.isnan(hit) and "empty" in r["note"]) or r["hit_rate"] == hit
                assert r["seconds"] > 0 and r["n_forward"] >= 1 and r["map_sum"] == pytest.approx(float(amap.double().sum()))
    record = json.loads(res.record.read_text())
    assert record["status"] == "complete" and record["counts"] == {"items": 27, "ok": 18, "error": 9, "skipped": 0, "missing": 0}
    assert record["config"]["methods"] == METHODS and record["config"]["options"]["integrated_gradients"]["steps"] == 4
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"] == torch.__version__
    assert record["seeds"]["run"] == 0 and record["started"] <= record["ended"]


def test_png_cases_npz_maps_cam_and_failures_as_rows(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / f"x{i}.png")
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "cases.csv").write_text("image,target\nx0.png,\nx1.png,2\nx2.png,7\nrgb.png,\n")
    res = run_manifest(tmp_path / "cases.csv", "test_run:tiny2d", "saliency,gradcam", tmp_path / "out",
                       layer="features.2", map_format="npz", batch_size=4)
    st = {(r["index"], r["method"]): r for r in res.rows}
    assert all(st[(i, m)]["status"] == "ok" for i in (0, 1) for m in ("saliency", "gradcam"))
    assert "out of range" in st[(2, "saliency")]["error"] and "channel mismatch" in st[(3, "gradcam")]["error"]
    with np.load(res.out / st[(1, "gradcam")]["map"]) as z:
        want = mx.explain(tiny2d(), torch.from_numpy(np.asarray(Image.open(tmp_path / "x1.png"), np.float32))[None, None],
                          "gradcam", target=2, layer="features.2").map[0]
        assert z["map"].shape == (1, 16, 16) and np.allclose(z["map"], want.numpy(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(z["affine"], np.eye(4))
    # an error item has its record and no map
    assert sorted(p.name for p in (res.out / "cases" / st[(2, "saliency")]["case_id"]).iterdir()) == \
        ["gradcam.json", "saliency.json"]


def test_resume_redoes_exactly_what_a_crash_left_incomplete(tmp_path):
    csv, model = volumes(tmp_path), scripted3d(tmp_path)
    ref = run_manifest(csv, model, METHODS, tmp_path / "ref", options=OPTIONS, batch_size=2)
    out = tmp_path / "out"
    run_manifest(csv, model, METHODS, out, options=OPTIONS, batch_size=2)
    store = RunStore(out)
    # States a kill can leave: a map without its record, a stale temporary file, a record whose map is gone.
    (out / "cases/00002_v2/occlusion.json").unlink()
    (out / "cases/00004_v4/.saliency.nii.gz.k3j9x_2a.nii.gz").write_bytes(b"half a file")
    (out / "cases/00005_v5/saliency.nii.gz").unlink()
    (out / "results.csv").unlink()
    res = run_manifest(csv, model, METHODS, out, options=OPTIONS, batch_size=2, resume=True)
    assert res.computed == 2 and res.skipped == 16 and len(res.removed_partials) == 1
    assert store.partial_files() == [] and outputs(out) == outputs(ref.out)


def test_resume_guards_and_extension(tmp_path):
    csv, model = volumes(tmp_path, n=2), scripted3d(tmp_path)
    out = tmp_path / "out"
    run_manifest(csv, model, ["saliency"], out)
    before = outputs(out)
    with pytest.raises(mx.errors.MedexplainError, match="--resume"):
        run_manifest(csv, model, ["saliency"], out)
    with pytest.raises(mx.errors.MedexplainError, match="batch_size: first run 4, now 3"):
        run_manifest(csv, model, ["saliency"], out, batch_size=3, resume=True)
    assert outputs(out) == before
    # A method added on resume extends the run; the earlier items are kept.
    res = run_manifest(csv, model, ["occlusion"], out, options={"window": 6}, resume=True)
    assert [r["method"] for r in res.rows] == ["saliency", "occlusion"] * 2 and res.computed == 2
    # Errors are complete items; --retry-errors redoes them once the input is fixed.
    v0, out2 = tmp_path / "v0.nii.gz", tmp_path / "out2"
    v0.rename(tmp_path / "away.nii.gz")
    assert run_manifest(csv, model, ["saliency"], out2).n_error == 1
    (tmp_path / "away.nii.gz").rename(v0)
    assert run_manifest(csv, model, ["saliency"], out2, resume=True).n_error == 1
    assert run_manifest(csv, model, ["saliency"], out2, resume=True, retry_errors=True).n_error == 0


def test_ray_backend_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    csv = volumes(tmp_path, n=1)
    with pytest.raises(mx.pipelines.run.BackendError, match=r"pip install 'medexplain\[ray\]'"):
        run_manifest(csv, scripted3d(tmp_path), ["saliency"], tmp_path / "out", backend="ray")
    assert not (tmp_path / "out").exists()


def _cli(*args):
    return [sys.executable, "-c", "from medexplain.cli import app; app()", "run", *args]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL the CLI at random moments (after a random number of finished items plus a random delay,
    so kills land mid-explanation, between a map and its record, or while the table is written), resume
    each time, and end with exactly the uninterrupted run's files and numbers, and no partial file."""
    csv = volumes(tmp_path, extra_rows=["missing.nii.gz,,1,"])
    model = scripted3d(tmp_path)
    ref = run_manifest(csv, model, METHODS, tmp_path / "ref", options=OPTIONS, batch_size=2)
    out, total = tmp_path / "out", len(ref.rows)
    args = _cli(str(csv), "--model", model, "--methods", ",".join(METHODS), "--out", str(out), "-o", "steps=4",
                "-o", "window=4", "--batch-size", "2", "--resume")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng, kills, started = random.Random(9), 0, 0
    for _ in range(40):  # until three kills landed mid-run (a fast machine may finish before a kill point)
        if kills == 3:
            break
        done = len(list(out.glob("cases/*/*.json")))
        if done > total - 3:  # too few items left for a kill to land mid-run: start the sequence over
            shutil.rmtree(out, ignore_errors=True)
            done, kills, started = 0, 0, 0
        # >= 1 new item and at most half of what is left, so three kills fit before the run ends
        wait_for = done + rng.randrange(1, max(2, (total - done) // 2))
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started += 1
        while p.poll() is None and len(list(out.glob("cases/*/*.json"))) < wait_for:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        for f in out.rglob("*"):  # every file with a final name is whole
            if f.is_file() and not f.name.startswith("."):
                if f.name.endswith(".nii.gz"):
                    assert np.isfinite(np.asarray(nib.load(str(f)).dataobj)).all()
                elif f.suffix == ".json":
                    json.loads(f.read_text())
    assert kills == 3
    final = subprocess.run(args, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert RunStore(out).partial_files() == []
    assert outputs(out) == outputs(ref.out)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["sessions"]) == started + 1 and record["sessions"][-1]["resumed"]


def test_local_worker_processes_write_the_same_maps_as_one_process(tmp_path):
    """The local backend's worker processes (forked from the fork server, each loading the model) write
    byte-identical maps to one in-process worker, whatever the number of workers."""
    csv = volumes(tmp_path, n=4)
    model = "test_run:tiny3d"     # with hooks (Grad-CAM's layer plan is probed once per process)
    one = run_manifest(csv, model, ["saliency", "gradcam", "integrated_gradients"], tmp_path / "one", options={"steps": 4},
                       batch_size=1, num_workers=1)
    two = run_manifest(csv, model, ["saliency", "gradcam", "integrated_gradients"], tmp_path / "two", options={"steps": 4},
                       batch_size=1, num_workers=2)
    assert outputs(two.out) == outputs(one.out)
    sessions = [json.loads(r.record.read_text())["sessions"][-1] for r in (one, two)]
    assert sessions[0]["workers"] == 1 and sessions[1]["workers"] == 2 and sessions[1]["processes"]
    if "forkserver" in multiprocessing.get_all_start_methods():   # forked from one fork server, not spawned
        assert sessions[1]["start_method"] == "forkserver"
    assert sessions[1]["worker_cpu_seconds"] > 0


def test_local_workers_are_given_the_runs_environment(tmp_path, monkeypatch):
    """A variable set after the workers' fork server started (credentials, CUDA_VISIBLE_DEVICES) reaches the
    workers, as it reached spawned ones: the fork server's environment is the one from when it started."""
    from medexplain.pipelines.run import backends
    from medexplain.pipelines.run.worker import WorkerSpec

    backends.prestart(WorkerSpec(model=mx.ModelSpec("test_run:tiny3d"), methods=[], out=str(tmp_path)), 2, 2)
    monkeypatch.setenv("MEDEXPLAIN_TEST_MARK", "run")
    res = run_manifest(volumes(tmp_path, n=2), "test_run:tiny3d_if_marked", ["saliency"], tmp_path / "out",
                       batch_size=1, num_workers=2)
    assert [r["status"] for r in res.rows] == ["ok", "ok"]
    assert json.loads(res.record.read_text())["sessions"][-1]["workers"] == 2


def test_a_model_that_fails_in_the_workers_is_a_clear_error(tmp_path):
    """Workers that cannot load the model say why (a pool whose initializer raises only reports a dead
    worker)."""
    with pytest.raises(mx.errors.MedexplainError, match="a local worker could not load the model: .*RuntimeError: "
                                                        "no model in worker processes"):
        run_manifest(volumes(tmp_path, n=2), "test_run:tiny3d_not_in_workers", ["saliency"], tmp_path / "out",
                     batch_size=1, num_workers=2)


def test_the_fork_server_preloads_what_every_worker_imports():
    """The workers' fork server imports MONAI, the worker's code and the model's loader once; a factory's own
    module is left to the workers (a module that raises on import would take the fork server down)."""
    from medexplain.pipelines.run.backends import preload_modules
    from medexplain.pipelines.run.worker import WorkerSpec

    base = ["__main__", "monai", "medexplain.pipelines.run.worker"]
    def of(**model):
        return preload_modules(WorkerSpec(model=mx.ModelSpec(**model), methods=[], out="o"))

    assert of(source="mynets:factory") == base
    assert of(source=["zoo:chest", "a.pt"]) == base + ["medexplain.models.zoo"]
    assert of(bundle="b") == base + ["medexplain.models.bundle"]
    assert of(nnunet="n")[-1] == "medexplain.models.nnunet"


def _descendants(pid: int) -> dict[int, int]:
    """The live descendants of ``pid`` (Linux /proc), each with its parent."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, {pid}
    while frontier:
        frontier = {k for k, p in parents.items() if p in frontier and k not in found}
        found.update({k: parents[k] for k in frontier})
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_local_workers_die_with_a_sigkilled_run(tmp_path):
    """A SIGKILLed `medexplain run` takes its worker processes with it: an orphan would go on writing into the
    folder that `--resume` completes (seen as a session missing from run.json in the SIGKILL test). The workers
    are the fork server's children (or the run's own, spawned); every process the run started must end."""
    csv = volumes(tmp_path, n=6)
    args = _cli(str(csv), "--model", scripted3d(tmp_path), "--method", "saliency,integrated_gradients",
                "--out", str(tmp_path / "out"), "-o", "steps=1024", "--batch-size", "1", "--num-workers", "2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers, started = time.time() + 60, [], {}
    while time.time() < deadline and p.poll() is None and len(workers) < 2:
        started = _descendants(p.pid)
        workers = [k for k, parent in started.items()   # forked by the fork server, or spawned by the run
                   if "multiprocessing" in _cmdline(k) and (parent != p.pid or "spawn_main" in _cmdline(k))]
        time.sleep(0.05)
    assert p.poll() is None and len(workers) == 2, "the run ended before its two workers were seen"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, started)):
        time.sleep(0.05)
    alive = [w for w in started if _alive(w)]
    for w in alive:   # leave no orphan behind when the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"processes {alive} ({'workers' if set(alive) & set(workers) else 'helpers'}) outlived their SIGKILLed run"


@pytest.mark.slow
def test_ray_backend_equals_local_backend(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'medexplain[ray]')")
    csv = volumes(tmp_path, n=4)
    model = scripted3d(tmp_path)
    local = run_manifest(csv, model, ["saliency", "integrated_gradients"], tmp_path / "local", options={"steps": 4},
                         batch_size=2)
    ray_run = run_manifest(csv, model, ["saliency", "integrated_gradients"], tmp_path / "ray", options={"steps": 4},
                           batch_size=2, backend="ray", num_workers=2)
    assert outputs(ray_run.out) == outputs(local.out)
    session = json.loads(ray_run.record.read_text())["sessions"][-1]
    assert session["backend"] == "ray" and session["workers"] == 2


def test_a_case_that_cannot_be_written_is_an_error_row_and_resume_goes_on(tmp_path, monkeypatch):
    """A per-case write failure (disk full, a bad affine, ...) is that case's error row, not the end of the
    run; --resume then continues (the failed case kept as an error row), --retry-errors redoes it."""
    import medexplain.pipelines.run.store as store_mod
    csv, model = volumes(tmp_path, n=3), scripted3d(tmp_path)
    real = store_mod.io.write_nifti

    def failing(arr, path, *a, **k):
        if "00001_v1" in str(path):
            raise OSError(28, "No space left on device")
        return real(arr, path, *a, **k)
    monkeypatch.setattr(store_mod.io, "write_nifti", failing)
    res = run_manifest(csv, model, ["saliency"], tmp_path / "out")
    st = {r["case_id"]: r for r in res.rows}
    assert [r["status"] for r in res.rows] == ["ok", "error", "ok"]
    assert st["00001_v1"]["error"].startswith("write: OSError") and "No space left" in st["00001_v1"]["error"]
    assert not (tmp_path / "out" / "cases" / "00001_v1" / "saliency.nii.gz").exists()
    again = run_manifest(csv, model, ["saliency"], tmp_path / "out", resume=True)        # continues, no refusal
    assert again.computed == 0 and again.skipped == 3 and again.n_error == 1
    monkeypatch.setattr(store_mod.io, "write_nifti", real)
    fixed = run_manifest(csv, model, ["saliency"], tmp_path / "out", resume=True, retry_errors=True)
    assert fixed.computed == 1 and fixed.n_error == 0
    # and a changed manifest is refused with the way to keep or redo a failed case instead
    (tmp_path / "cases.csv").write_text("\n".join((tmp_path / "cases.csv").read_text().splitlines()[:3]) + "\n")
    with pytest.raises(mx.errors.MedexplainError, match="--retry-errors redoes it"):
        run_manifest(csv, model, ["saliency"], tmp_path / "out", resume=True)


def test_real_cr_with_zero_pixel_spacing_runs_with_a_note(tmp_path):
    import pydicom.data
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    (tmp_path / "cases.csv").write_text(f"image\n{path}\n")
    res = run_manifest(tmp_path / "cases.csv", "test_dicom:pooled2d", ["saliency"], tmp_path / "out")
    (row,) = res.rows
    assert row["status"] == "ok" and "1 mm assumed" in row["note"]
    img = nib.load(str(res.out / row["map"]))
    assert img.shape == (1955, 1841, 1) and np.allclose(img.header.get_zooms()[:2], 1.0)
