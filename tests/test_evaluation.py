"""The folder evaluator (``medexplain.evaluation``, run by ``medexplain evaluate``) called from Python."""
import csv
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medexplain.errors import FileFormatError, InputError
from medexplain.evaluation import evaluate_folders, evaluate_localisation, index_folder, pair
from medexplain.metrics.localisation import hit_rate, iou


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
        assert float(got) == pytest.approx(mi)
    assert res.results["hitrate"].mean[0] == pytest.approx(2 / 3)
    summary = list(csv.DictReader(open(out / "hitrate_summary_results.csv")))
    assert summary[0]["name"] == "nodule" and float(summary[0]["mean"]) == pytest.approx(2 / 3)

    tuned = evaluate_localisation(maps, masks, tmp_path / "tuned", metric="miou", threshold="tuned", val_maps=maps,
                                  val_masks=masks, n_boot=10)
    assert set(tuned.thresholds) == {"nodule"} and "hitrate" not in tuned.results
    assert list(csv.DictReader(open(tmp_path / "tuned" / "tuning_results.csv")))[0]["task"] == "nodule"


def test_options_are_checked_before_any_file_is_read(tmp_path):
    for kw, msg in (({"metric": "auc"}, "--metric"), ({"ties": "all"}, "--ties"), ({"mode": "dice"}, "--mode"),
                    ({"cutoff": 0.5}, "--probs and --cutoff"), ({"threshold": "tuned"}, "--val-maps"),
                    ({"threshold": "high"}, "--threshold")):
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
