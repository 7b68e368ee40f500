"""The folder evaluator (``medexplain.pipelines.evaluation``, run by ``medexplain evaluate``) called from Python."""
import csv
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medexplain.errors import FileFormatError, InputError
from medexplain.metrics.localisation import hit_rate, iou
from medexplain.pipelines.evaluation import evaluate_folders, evaluate_localisation, index_folder, pair


def _folders(tmp_path):
    """Class folder ``nodule`` (PNG masks, .npy maps with a channel axis; names with dots) and root-level files."""
    maps, masks = tmp_path / "maps", tmp_path / "masks"
    (maps / "nodule").mkdir(parents=True)
    (masks / "nodule").mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(4):
        gt = np.zeros((8, 8), np.uint8)
        if i < 3:
            gt[2:5, 3:6] = 255
        m = rng.random((8, 8)) * 0.1
        m[3, 4] = 1.0 if i != 1 else 0.0
        if i == 1:
            m[7, 7] = 1.0                                              # case 1 misses
        name = f"pt{i}.scan.v2"
        Image.fromarray(gt).save(masks / "nodule" / f"{name}.png")
        np.save(maps / "nodule" / f"{name}.npy", m[None])
        truth[name] = (m, gt > 0)
    np.save(maps / "nodule" / "extra.npy", np.zeros((8, 8)))           # a map without a mask: ignored, counted
    return maps, masks, truth


def test_index_folder_uses_the_one_stem_rule(tmp_path):
    maps, masks, _ = _folders(tmp_path)
    idx = index_folder(masks)
    assert sorted(idx) == [("nodule", f"pt{i}.scan.v2") for i in range(4)]
    np.save(masks / "root.case.npy", np.zeros((8, 8)))
    assert ("all", "root.case") in index_folder(masks)
    (masks / "nodule" / "pt0.scan.v2.npy").write_bytes(b"")            # same case twice
    with pytest.raises(FileFormatError, match="two files"):
        index_folder(masks)
    with pytest.raises(FileFormatError, match="not a folder"):
        index_folder(tmp_path / "nope")


def test_evaluate_localisation_writes_the_csvs_and_matches_the_metrics(tmp_path):
    maps, masks, truth = _folders(tmp_path)
    out = tmp_path / "out"
    res = evaluate_localisation(maps, masks, out, n_boot=50, seed=0)
    assert res.classes == ["nodule"] and res.cases == sorted(truth) and res.unpaired_maps == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in res.files)   # no temporary file left
    rows = {r["img_id"]: r for r in csv.DictReader(open(out / "hitrate_results.csv"))}
    for name, (m, gt) in truth.items():
        a, g = torch.from_numpy(m)[None, None], torch.from_numpy(gt)[None]
        want = float(hit_rate(a, g)[0])
        assert rows[name]["nodule"] == ("" if math.isnan(want) else repr(want))
        mi = float(iou(a, g, threshold="otsu", mode="tp_fp_fn")[0])
        got = [r for r in csv.DictReader(open(out / "miou_tp_fp_fn_results.csv")) if r["img_id"] == name][0]["nodule"]
        assert got == ("" if math.isnan(mi) else repr(mi))
    assert res.results["hitrate"].mean[0] == pytest.approx(2 / 3)
    summary = list(csv.DictReader(open(out / "hitrate_summary_results.csv")))
    assert summary[0]["name"] == "nodule" and float(summary[0]["point"]) == pytest.approx(2 / 3)
    assert float(summary[0]["mean"]) == res.results["hitrate"].bs_mean[0]          # CheXlocalize's mean column

    tuned = evaluate_localisation(maps, masks, tmp_path / "tuned", metric="miou", threshold="tuned", val_maps=maps,
                                  val_masks=masks, n_boot=10)
    assert set(tuned.thresholds) == {"nodule"} and "hitrate" not in tuned.results
    assert list(csv.DictReader(open(tmp_path / "tuned" / "tuning_results.csv")))[0]["task"] == "nodule"


def test_options_are_checked_before_any_file_is_read(tmp_path):
    for kw, msg in (({"metric": "auc"}, "--metric"), ({"ties": "all"}, "--ties"), ({"mode": "dice"}, "--mode"),
                    ({"cutoff": 0.5}, "--probs and --cutoff"), ({"threshold": "tuned"}, "--val-maps"),
                    ({"threshold": "high"}, "--threshold"), ({"threshold": "nodule=high"}, "--threshold"),
                    ({"ci": "bca"}, "--ci"), ({"mean_of": "median"}, "--mean"),
                    ({"probs": tmp_path / "p.csv", "cutoff": "cutoffs.csv"}, "--cutoff")):
        with pytest.raises(InputError, match=msg):
            evaluate_localisation(tmp_path / "no_maps", tmp_path / "no_masks", tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_missing_maps_and_pairing_rules(tmp_path):
    maps, masks, _ = _folders(tmp_path)
    os.remove(maps / "nodule" / "pt2.scan.v2.npy")
    with pytest.raises(FileFormatError, match="without a map"):
        evaluate_folders(maps, masks)
    a, m = pair(torch.zeros(8, 8), torch.zeros(3, 8, 8), "rgb")           # an RGB PNG mask of a 2D map
    assert a.shape == (1, 1, 8, 8) and m.shape == (1, 8, 8)
    with pytest.raises(InputError, match="does not fit"):
        pair(torch.zeros(2, 2, 8, 8), torch.zeros(8, 8), "x")


def _two_class_folders(tmp_path):
    """Classes ``marker`` and ``nodule``, four cases each, maps that give different IoUs at different
    thresholds (a ramp inside the mask plus noise)."""
    maps, masks = tmp_path / "maps", tmp_path / "masks"
    rng = np.random.default_rng(1)
    for cls, box in (("nodule", (slice(2, 6), slice(2, 6))), ("marker", (slice(0, 3), slice(5, 8)))):
        (maps / cls).mkdir(parents=True)
        (masks / cls).mkdir(parents=True)
        for i in range(4):
            gt = np.zeros((8, 8), bool)
            gt[box] = i < 3
            m = rng.random((8, 8)) * 0.5
            m[box] += np.linspace(0.2, 1.0, gt[box].size).reshape(gt[box].shape)
            np.save(masks / cls / f"case{i}.npy", gt)
            np.save(maps / cls / f"case{i}.npy", m)
    return maps, masks


def _column(path, cls):
    return {r["img_id"]: r[cls] for r in csv.DictReader(open(path))}


def test_evaluate_reads_back_the_thresholds_it_wrote(tmp_path):
    """``medexplain evaluate --threshold tuned`` writes tuning_results.csv; ``--threshold`` that file (and the
    same values as class=value pairs, and CheXlocalize's own layout with its column order and extra
    classes) gives the same per-case IoUs as the tuned run."""
    from typer.testing import CliRunner

    from medexplain.cli import app
    maps, masks = _two_class_folders(tmp_path)
    base = ["evaluate", "--maps", str(maps), "--masks", str(masks), "--metric", "miou", "--n-boot", "20"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "tuned"), "--threshold", "tuned",
                                 "--val-maps", str(maps), "--val-masks", str(masks)])
    assert r.exit_code == 0, r.output
    written = {row["task"]: float(row["threshold"]) for row in csv.DictReader(open(tmp_path / "tuned" / "tuning_results.csv"))}
    assert sorted(written) == ["marker", "nodule"] and written["marker"] != written["nodule"]
    want = {c: _column(tmp_path / "tuned" / "miou_tp_fp_fn_results.csv", c) for c in written}
    chex = tmp_path / "chexlocalize_tuning_results.csv"
    chex.write_text("threshold,task\n0.4,Airspace Opacity\n" + "".join(f"{t!r},{c}\n" for c, t in written.items()))
    pairs = ",".join(f"{c}={t!r}" for c, t in written.items())
    for i, spec in enumerate((str(tmp_path / "tuned" / "tuning_results.csv"), str(chex), pairs)):
        out = tmp_path / f"read{i}"
        r = CliRunner().invoke(app, [*base, "--out", str(out), "--threshold", spec])
        assert r.exit_code == 0, r.output
        assert not (out / "tuning_results.csv").exists()                   # read, not tuned: nothing rewritten
        for c in written:
            assert _column(out / "miou_tp_fp_fn_results.csv", c) == want[c], (spec, c)
    otsu = tmp_path / "otsu"
    assert CliRunner().invoke(app, [*base, "--out", str(otsu)]).exit_code == 0
    assert any(_column(otsu / "miou_tp_fp_fn_results.csv", c) != want[c] for c in written)   # the test can fail


def test_per_class_thresholds_and_cutoffs_in_chexlocalize_formats(tmp_path):
    from medexplain.pipelines.evaluation import read_class_values
    (tmp_path / "t.csv").write_text("task,threshold\nnodule,0.3\nmarker,0.6\n")        # columns in any order
    assert read_class_values(tmp_path / "t.csv") == {"nodule": 0.3, "marker": 0.6}
    (tmp_path / "p.csv").write_text("prob_threshold,mIoU,task\n0.0,0.12,nodule\n0.1,0.20,nodule\n"
                                    "0.2,0.20,nodule\n0.3,nan,nodule\n0.0,0.5,marker\n0.1,0.4,marker\n")
    # CheXlocalize's probability_tuning_results.csv: per task the cutoff of largest mIoU, first on ties
    assert read_class_values(tmp_path / "p.csv", "cutoff") == {"nodule": 0.1, "marker": 0.0}
    (tmp_path / "c.csv").write_text("cutoff,task\n0.5,nodule\n0.25,marker\n")
    assert read_class_values(tmp_path / "c.csv", "cutoff") == {"nodule": 0.5, "marker": 0.25}
    for text, msg in (("threshold,task\n0.3,nodule\n0.4,nodule\n", "twice"), ("thr,task\n0.3,nodule\n", "column"),
                      ("threshold,task\nhigh,nodule\n", "not a number")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(FileFormatError, match=msg):
            read_class_values(tmp_path / "bad.csv")

    maps, masks = _two_class_folders(tmp_path)
    probs = tmp_path / "probs.csv"
    probs.write_text("img_id,nodule,marker\n" + "".join(f"case{i},{0.1 * (i + 1)},0.9\n" for i in range(4)))
    res = evaluate_localisation(maps, masks, tmp_path / "cut", metric="miou", probs=probs, cutoff="nodule=0.25,marker=0.5",
                                n_boot=10)
    plain = evaluate_localisation(maps, masks, tmp_path / "plain", metric="miou", n_boot=10)
    cut, ref = (_column(tmp_path / d / "miou_tp_fp_fn_results.csv", "nodule") for d in ("cut", "plain"))
    assert [cut[f"case{i}"] for i in range(2)] == ["0.0", "0.0"]             # prob 0.1, 0.2 < 0.25: no mask, FN
    assert [cut[f"case{i}"] for i in (2,)] == [ref["case2"]] and float(ref["case0"]) > 0
    assert _column(tmp_path / "cut" / "miou_tp_fp_fn_results.csv", "marker") == \
        _column(tmp_path / "plain" / "miou_tp_fp_fn_results.csv", "marker")     # 0.9 >= 0.5: unchanged
    assert res.classes == plain.classes == ["marker", "nodule"]
    with pytest.raises(InputError, match="no threshold for class"):
        evaluate_localisation(maps, masks, tmp_path / "x", metric="miou", threshold="nodule=0.4")
    with pytest.raises(InputError, match="no cutoff for class"):
        evaluate_localisation(maps, masks, tmp_path / "x", metric="miou", probs=probs, cutoff={"marker": 0.5})
    assert not (tmp_path / "x").exists()


def test_interval_and_mean_column_choices(tmp_path):
    maps, masks = _two_class_folders(tmp_path)
    res = {}
    for ci in ("order-statistic", "percentile"):
        for mean_of in ("bootstrap", "point"):
            out = tmp_path / f"{ci}-{mean_of}"
            res[ci, mean_of] = evaluate_localisation(maps, masks, out, metric="miou", n_boot=200, ci=ci,
                                                     mean_of=mean_of)
            rows = {r["name"]: r for r in csv.DictReader(open(out / "miou_tp_fp_fn_summary_results.csv"))}
            boot = res[ci, mean_of].results["miou_tp_fp_fn"]
            reps = np.array([[float(x) for x in row.values()]
                             for row in csv.DictReader(open(out / "miou_tp_fp_fn_bootstrap_results.csv"))])
            want_mean = reps.mean(0) if mean_of == "bootstrap" else boot.mean
            assert np.allclose([float(rows[n]["mean"]) for n in boot.names], want_mean)
            srt = np.sort(reps, 0)
            lower = srt[int(0.025 * 200) - 1] if ci == "order-statistic" else np.percentile(reps, 2.5, axis=0)
            assert np.allclose([float(rows[n]["lower"]) for n in boot.names], lower)
    default = evaluate_localisation(maps, masks, tmp_path / "default", metric="miou", n_boot=200).results["miou_tp_fp_fn"]
    assert default.ci == "order-statistic" and default.mean_of == "bootstrap"
    assert not np.allclose(res["order-statistic", "bootstrap"].results["miou_tp_fp_fn"].summary_mean,
                           res["order-statistic", "point"].results["miou_tp_fp_fn"].summary_mean)


def test_evaluate_keeps_the_map_dtype(tmp_path):
    """A float32 map is evaluated in float32, as CheXlocalize and the API compute it: a constant float32 map on a
    coarser grid than its mask gets interpolation noise of a few ulps when resized, which Otsu then splits, and
    that noise differs in float64 (evaluate read every map as float64 and gave other masks)."""
    maps, masks = tmp_path / "maps" / "nodule", tmp_path / "masks" / "nodule"
    maps.mkdir(parents=True)
    masks.mkdir(parents=True)
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[:, 5:15, 5:15] = True
    arrays = {f"c{i}": torch.full((1, 1, 7, 9), v, dtype=torch.float32) for i, v in enumerate((0.3, 1.3, 0.123))}
    for case, a in arrays.items():
        np.save(maps / f"{case}.npy", a[0, 0].numpy())
        Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).save(masks / f"{case}.png")
    got = evaluate_folders(tmp_path / "maps", tmp_path / "masks", mode="tp_fp_fn").tables["miou"][:, 0]
    api = [float(iou(a, mask, mode="tp_fp_fn")[0]) for a in arrays.values()]
    as64 = [float(iou(a.double(), mask, mode="tp_fp_fn")[0]) for a in arrays.values()]
    assert list(got) == api
    assert api != as64                                  # the case tells the dtypes apart
