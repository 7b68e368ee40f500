"""CheXlocalize-style localisation metrics against hand-computed cases."""
import csv
import math

import numpy as np
import pytest
import torch

import medexplain as mx
from medexplain.errors import InputError
from medexplain.metrics.localisation import binarize, bootstrap_ci, iou, tune_thresholds, write_results

nan = float("nan")


def same(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_hit_rate_hand_cases_ties_and_empty():
    maps = torch.zeros(4, 1, 3, 3)
    maps[0, 0, 1, 2] = 5          # peak inside the mask -> hit
    maps[1, 0, 0, 0] = 5          # peak outside -> miss
    maps[2, 0, 2, 2] = 1          # empty mask -> NaN
    maps[3, 0, 1, 1] = maps[3, 0, 0, 2] = 7   # tie: first maximum in C order is (0, 2)
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    masks[0, 1, 2] = masks[1, 2, 2] = True
    masks[3, 0, 2] = True
    assert same(mx.metrics.hit_rate(maps, masks), [1.0, 0.0, nan, 1.0])
    flat = torch.zeros(1, 1, 3, 3)           # constant map: argmax = voxel 0
    assert same(mx.metrics.hit_rate(flat, masks[3:4]), [0.0])
    m0 = masks[3:4].clone()
    m0[0, 0, 0] = True
    assert same(mx.metrics.hit_rate(flat, m0), [1.0])


def test_hit_rate_any_tie_rule_counts_a_peak_block_that_touches_the_mask():
    """A piecewise-constant map (one 2x2 block at the maximum): the first-maximum rule looks only at the
    block's top-left voxel, ties='any' at every voxel of the block; a peak elsewhere misses under both."""
    maps = torch.zeros(3, 1, 4, 4)
    maps[:, 0, 2:, 2:] = 3.0                     # best block: rows 2-3, cols 2-3 (first max at (2, 2))
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 3, 3] = True                        # inside the block, not its first voxel
    masks[1, 2, 2] = True                        # the first voxel itself
    masks[2, 0, 0] = True                        # off the block
    assert same(mx.metrics.hit_rate(maps, masks), [0.0, 1.0, 0.0])
    assert same(mx.metrics.hit_rate(maps, masks, ties="any"), [1.0, 1.0, 0.0])
    assert same(mx.metrics.hit_rate(maps, torch.zeros(1, 4, 4, dtype=torch.bool)[[0, 0, 0]], ties="any"), [nan] * 3)
    with pytest.raises(InputError, match="ties"):
        mx.metrics.hit_rate(maps, masks, ties="all")


def test_hit_rate_resizes_the_map_and_is_nd_and_per_class():
    small = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])   # bilinear to 4x4: only (3, 3) keeps the value 3
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3, 3] = True
    assert same(mx.metrics.hit_rate(small, mask), [1.0])
    mask2 = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask2[0, 2, 2] = True
    assert same(mx.metrics.hit_rate(small, mask2), [0.0])
    maps = torch.zeros(2, 2, 2, 3, 3)                  # 3D, two classes
    masks = torch.zeros(2, 2, 2, 3, 3, dtype=torch.bool)
    maps[0, 0, 1, 2, 0] = 1
    masks[0, 0, 1, 2, 0] = True
    maps[0, 1, 0, 0, 1] = 1
    masks[0, 1, 1, 1, 1] = True
    maps[1, 0, 1, 1, 1] = 1                            # class 0 of case 1: empty mask
    masks[1, 1] = True                                 # class 1 of case 1: everything
    assert same(mx.metrics.hit_rate(maps, masks), [[1.0, 0.0], [nan, 1.0]])
    with pytest.raises(InputError):
        mx.metrics.hit_rate(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


def test_iou_fixed_threshold_and_modes():
    m = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=torch.float64)  # normalised 0, 1/3, 2/3, 1
    gt = torch.tensor([[[False, True], [False, True]]])
    # t = 0.5 -> predicted {(1,0), (1,1)}; truth {(0,1), (1,1)}: 1 / 3
    assert math.isclose(float(iou(m, gt, threshold=0.5)[0]), 1 / 3)
    assert math.isclose(float(iou(m, gt, threshold=0.2)[0]), 2 / 3)     # {(0,1),(1,0),(1,1)}
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    flat = torch.ones(1, 1, 2, 2)                                        # constant -> no predicted mask
    for mode, fp, fn, tn in [("tp", nan, nan, nan), ("tp_fp_fn", 0.0, 0.0, nan), ("tp_fn", nan, 0.0, nan)]:
        assert same(iou(m, empty, threshold=0.5, mode=mode), [fp]), mode
        assert same(iou(flat, gt, threshold=0.5, mode=mode), [fn]), mode
        assert same(iou(flat, empty, threshold=0.5, mode=mode), [tn]), mode
    with pytest.raises(InputError):
        iou(m, gt, mode="fp")


def test_iou_otsu_float_matches_skimage_and_per_class_thresholds():
    from skimage.filters import threshold_otsu
    torch.manual_seed(0)
    maps = torch.rand(3, 2, 6, 5, dtype=torch.float64)
    maps[:, :, :3] += 2                                                   # bimodal
    masks = torch.rand(3, 2, 6, 5) > 0.5
    got = iou(maps, masks, threshold="otsu_float", mode="tp_fp_fn")
    for b in range(3):
        for k in range(2):
            v = maps[b, k].numpy()
            v = (v - v.min()) / (v.max() - v.min())
            p, g = v > threshold_otsu(v), masks[b, k].numpy()
            assert math.isclose(float(got[b, k]), (p & g).sum() / (p | g).sum())
    both = iou(maps, masks, threshold=[0.1, 0.9], mode="tp_fp_fn")
    assert same(both[:, 0], iou(maps[:, :1], masks[:, :1], threshold=0.1, mode="tp_fp_fn"))
    assert same(both[:, 1], iou(maps[:, 1:], masks[:, 1:], threshold=0.9, mode="tp_fp_fn"))
    assert binarize(maps, [0.1, 0.9]).dtype == torch.bool
    with pytest.raises(InputError, match="otsu_float"):
        binarize(maps, "otsu_uint8")


def _ring_map():
    """9 x 9: a ring of 1.0 (the border of rows/cols 2..6) around a 3 x 3 hole of 0.25, background 0, and
    one isolated pixel of 1.0 in the corner (0, 8)."""
    m = torch.zeros(9, 9, dtype=torch.float64)
    m[2:7, 2:7] = 1.0
    m[3:6, 3:6] = 0.25
    m[0, 8] = 1.0
    return m


def test_otsu_is_chexlocalize_uint8_otsu_with_filled_holes_and_no_isolated_pixels():
    """CheXlocalize's rule on a hand-built map with a hole: uint8 levels 255 (ring, corner pixel), 63 (hole),
    0 (background); Otsu separates {0, 63} from {255} (between-class variance 9614 against 7371 for {0} |
    {63, 255}); every contour is filled (the hole joins the mask) and the one-point contour of the
    isolated pixel is dropped. The float variant keeps the ring and the pixel, hole open."""
    m = _ring_map()
    filled = torch.zeros(9, 9, dtype=torch.bool)
    filled[2:7, 2:7] = True                                              # ring + hole
    ring = (m == 1.0)                                                    # ring + corner pixel, hole open
    assert torch.equal(binarize(m[None, None], "otsu")[0, 0], filled)
    assert torch.equal(binarize(m[None, None])[0, 0], filled)            # "otsu" is the default
    assert torch.equal(binarize(m[None, None], "otsu_float")[0, 0], ring)
    gt = filled[None]
    assert float(iou(m[None, None], gt, threshold="otsu")[0]) == 1.0
    assert math.isclose(float(iou(m[None, None], gt, threshold="otsu_float")[0]), 16 / 26)
    m3 = torch.zeros(7, 7, 7, dtype=torch.float64)                       # 3D: a hollow cube is filled
    m3[1:6, 1:6, 1:6] = 2.0
    m3[2:5, 2:5, 2:5] = 0.0
    cube = torch.zeros(7, 7, 7, dtype=torch.bool)
    cube[1:6, 1:6, 1:6] = True
    assert torch.equal(binarize(m3[None, None], "otsu")[0, 0], cube)
    assert not binarize(torch.ones(1, 1, 4, 4), "otsu").any()           # constant: nothing predicted
    with pytest.raises(InputError, match="NaN"):
        binarize(torch.full((1, 1, 3, 3), nan))


def test_otsu_truncates_to_uint8_like_the_reference():
    """np.uint8(255 * m) truncates: 0.5 -> 127 and 0.498 -> 126 (rounding would give 128 and 127). The uint8
    levels are 0, 51, 126, 127, 204, 229, 255 and Otsu's threshold is 127 (on rounded levels it would be
    51, keeping ten more pixels): the mask is the pixels >= 0.8, minus the isolated 1.0 at (3, 3)."""
    m = torch.tensor([[0.0, 0.498, 0.5, 0.5], [1.0, 0.9, 0.0, 0.5], [0.0, 0.9, 0.2, 0.5], [0.8, 0.5, 0.498, 1.0]])
    u = (255 * m.numpy()).astype(np.uint8)
    assert u[0].tolist() == [0, 126, 127, 127]
    want = (m >= 0.8).numpy()
    want[3, 3] = False
    assert np.array_equal(binarize(m[None, None], "otsu")[0, 0].numpy(), want)
    pytest.importorskip("cv2")
    from reference_protocols import chexlocalize_segmentation
    assert np.array_equal(chexlocalize_segmentation(m.numpy()), want)


def test_otsu_equals_the_opencv_reference_procedure_on_synthetic_maps():
    """The published procedure (OpenCV THRESH_OTSU on uint8, findContours RETR_TREE, PIL polygons of every
    contour of more than one point; ``tests/reference_protocols.py``) against ``binarize(..., "otsu")``,
    which uses no OpenCV: equal on all 100 CAM-like maps, the hand-built ring and 60 near-binary shapes.
    The float variant differs on most of the CAM-like maps, so the comparison can tell the rules apart."""
    pytest.importorskip("cv2")
    from reference_protocols import chexlocalize_segmentation, synthetic_cases
    maps, _ = synthetic_cases(n=20, k=5)
    ours = binarize(maps, "otsu").numpy()
    ref = np.stack([[chexlocalize_segmentation(maps[b, c].numpy()) for c in range(5)] for b in range(20)])
    assert np.array_equal(ours, ref)
    assert (binarize(maps, "otsu_float").numpy() != ref).reshape(100, -1).any(1).sum() > 50
    ring = _ring_map().float().numpy()
    assert np.array_equal(chexlocalize_segmentation(ring), binarize(torch.from_numpy(ring)[None, None])[0, 0].numpy())
    from reference_protocols import binary_shapes
    for m in binary_shapes(60):                    # holes, one-pixel diagonal links, border contact
        assert np.array_equal(binarize(torch.from_numpy(m)[None, None], "otsu")[0, 0].numpy(), chexlocalize_segmentation(m))


def test_iou_modes_match_chexlocalize_true_pos_only():
    """CheXlocalize's calculate_iou: true_pos_only=True is mode "tp", False is "tp_fp_fn" (not "tp_fn")."""
    from reference_protocols import chexlocalize_iou
    gt = torch.zeros(4, 3, 3, dtype=torch.bool)
    pred = torch.zeros(4, 3, 3, dtype=torch.bool)
    gt[0, 0, :2] = pred[0, 0, 1:] = True         # TP: IoU 1/3
    pred[1, 1, 1] = True                         # FP: empty truth
    gt[2, 2, 2] = True                           # FN: nothing predicted
    maps = pred.double().unsqueeze(1)            # binarises back to ``pred`` at threshold 0.5
    for mode, tpo in (("tp", True), ("tp_fp_fn", False)):
        want = [chexlocalize_iou(pred[i].numpy(), gt[i].numpy(), tpo) for i in range(4)]
        assert same(iou(maps, gt, threshold=0.5, mode=mode), want), mode
    want = [chexlocalize_iou(pred[i].numpy(), gt[i].numpy(), False) for i in range(4)]
    assert not same(iou(maps, gt, threshold=0.5, mode="tp_fn"), want)     # the FP case: NaN instead of 0


def test_probability_cutoff_turns_predictions_off():
    m = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]] * 2, dtype=torch.float64)
    gt = torch.tensor([[[False, True], [False, True]]] * 2)
    v = iou(m, gt, threshold=0.5, prob=[0.2, 0.8], cutoff=0.5, mode="tp_fp_fn")
    assert same(v, [0.0, 1 / 3])                                          # case 0: FN, scores 0
    assert same(iou(m, gt, threshold=0.5, prob=[0.2, 0.8], cutoff=0.5, mode="tp"), [nan, 1 / 3])
    with pytest.raises(InputError):
        iou(m, gt, prob=[0.2, 0.8])


def test_tune_thresholds_finds_the_known_optimum():
    ramp = torch.arange(10, dtype=torch.float64).view(1, 1, 1, 10)       # normalised k / 9
    gt = (torch.arange(10) >= 7).view(1, 1, 10)
    # thresholds in [6/9, 7/9) give IoU 1; the smallest grid point there is 0.67
    t = tune_thresholds(ramp, gt, mode="tp_fp_fn")
    assert t.shape == (1,) and math.isclose(float(t[0]), 0.67)
    for threshold_chunk in (1, 7, 100):                                  # how many candidates are scored together
        assert torch.equal(tune_thresholds(ramp, gt, mode="tp_fp_fn", threshold_chunk=threshold_chunk), t)
    with pytest.raises(InputError, match="threshold_chunk"):
        tune_thresholds(ramp, gt, threshold_chunk=0)
    two = tune_thresholds(torch.cat([ramp, ramp.flip(-1)], 1), torch.stack([gt, gt.flip(-1)], 1),
                          candidates=[0.1, 0.5, 0.7, 0.75])
    assert torch.allclose(two, torch.tensor([0.7, 0.7], dtype=two.dtype))
    none = tune_thresholds(ramp, torch.zeros(1, 1, 10, dtype=torch.bool), mode="tp")
    assert torch.isnan(none).all()


def test_bootstrap_known_cases():
    r = bootstrap_ci([0.4] * 7, n=200)
    assert r.names == ["value"] and np.allclose([r.mean[0], r.lower[0], r.upper[0]], 0.4)
    r = bootstrap_ci([0.0, 1.0], n=4000, seed=1)          # replicate means are 0, 0.5, 1 w.p. 1/4, 1/2, 1/4
    assert r.lower[0] == 0.0 and r.upper[0] == 1.0 and abs(r.bs_mean[0] - 0.5) < 0.03
    assert abs((r.replicates[:, 0] == 0.5).mean() - 0.5) < 0.03
    a = np.array([0.0, 0.2, 0.9, 1.0, 0.4])
    joint = bootstrap_ci(np.stack([a, 1 - a], 1), n=500, names=["x", "y"])
    assert joint.names == ["x", "y", "mean"]
    assert np.allclose(joint.replicates[:, 2], 0.5)        # same rows for both classes
    assert np.allclose([joint.lower[2], joint.upper[2]], 0.5)
    idx = np.random.default_rng(0).integers(0, 5, size=(500, 5))
    assert np.allclose(joint.replicates[:, 0], a[idx].mean(1))
    assert np.isclose(joint.lower[0], np.percentile(a[idx].mean(1), 2.5))
    ch = bootstrap_ci(a, n=500, method="order-statistic")
    srt = np.sort(a[idx].mean(1))
    assert ch.lower[0] == srt[int(0.025 * 500) - 1] and ch.upper[0] == srt[int(0.975 * 500) - 1]
    assert bootstrap_ci(a, n=500, method="chexlocalize").lower[0] == ch.lower[0]     # the former name
    thousand = bootstrap_ci(a, n=1000, method="order-statistic")
    srt = np.sort(thousand.replicates[:, 0])
    assert thousand.lower[0] == srt[24] and thousand.upper[0] == srt[974]            # compute_cis, n = 1000
    assert ch.rows()[0]["mean"] == ch.mean[0] and ch.rows()[0]["point"] == ch.mean[0]
    boot = bootstrap_ci(a, n=500, mean_of="bootstrap")
    assert boot.rows()[0]["mean"] == boot.bs_mean[0] != boot.mean[0]
    with pytest.raises(InputError, match="interval"):
        bootstrap_ci(a, method="bca")
    with pytest.raises(InputError, match="mean column"):
        bootstrap_ci(a, mean_of="median")
    withnan = bootstrap_ci([[1.0, nan], [0.0, nan], [nan, 1.0]], n=100)
    assert withnan.n_cases.tolist() == [2, 1, 3] and math.isclose(withnan.mean[0], 0.5)
    assert math.isclose(withnan.mean[2], 0.75)


def test_write_results_produces_chexlocalize_files(tmp_path):
    vals = torch.tensor([[1.0, nan], [0.0, 1.0], [1.0, 0.0]])
    res = write_results(vals, tmp_path, "hitrate", names=["nodule", "marker"], case_ids=["a", "b", "c"], n=50)
    rows = list(csv.reader(open(tmp_path / "hitrate_results.csv")))
    assert rows[0] == ["img_id", "nodule", "marker"] and rows[1] == ["a", "1.0", ""]
    boot = list(csv.reader(open(tmp_path / "hitrate_bootstrap_results.csv")))
    assert boot[0] == ["nodule", "marker", "mean"] and len(boot) == 51
    summary = list(csv.DictReader(open(tmp_path / "hitrate_summary_results.csv")))
    assert [r["name"] for r in summary] == ["nodule", "marker", "mean"]
    assert math.isclose(float(summary[0]["point"]), 2 / 3) and math.isclose(float(summary[1]["point"]), 0.5)
    # CheXlocalize's summary: mean = mean of the replicates, bounds = order statistics of the replicates
    def col(name):
        return [float(r[name] or "nan") for r in summary]

    reps = np.array([[float(x or "nan") for x in row] for row in boot[1:]])   # a replicate without "marker": NaN
    assert col("mean") == col("bs_mean") and np.allclose(col("mean"), np.nanmean(reps, 0))
    srt = np.sort(reps, 0)                                                     # NaN last, as pandas sorts
    assert same(col("lower"), srt[int(0.025 * 50) - 1]) and same(col("upper"), srt[int(0.975 * 50) - 1])
    assert math.isclose(res.mean[2], (2 / 3 + 0.5) / 2)
    write_results(vals, tmp_path, "hitrate", names=["nodule", "marker"], n=50, method="percentile", mean_of="point")
    summary = list(csv.DictReader(open(tmp_path / "hitrate_summary_results.csv")))
    assert math.isclose(float(summary[0]["mean"]), 2 / 3)
    assert math.isclose(float(summary[0]["lower"]), np.nanpercentile(reps[:, 0], 2.5))


def test_evaluate_cli_writes_the_three_csvs(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from medexplain.cli import app
    maps, masks, val_maps, val_masks = (tmp_path / d for d in ("maps", "masks", "vmaps", "vmasks"))
    for root in (maps, masks, val_maps, val_masks):
        (root / "nodule").mkdir(parents=True)
        (root / "marker").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        gt = np.zeros((8, 8), np.uint8)
        if i < 3:
            gt[2:5, 3:6] = 255
        m = rng.random((8, 8)) * 0.1
        m[3, 4] = 1.0 if i != 1 else 0.0                      # case 1 misses
        if i == 1:
            m[7, 7] = 1.0
        for mp, mk in ((maps, masks), (val_maps, val_masks)):
            Image.fromarray(gt).save(mk / "nodule" / f"case{i}.png")
            np.save(mp / "nodule" / f"case{i}.npy", m[None])
            vol = np.zeros((2, 4, 4))
            vol[1, 1, 1] = 1                                   # a second class whose maps are 2D with channel
            np.save(mk / "marker" / f"case{i}.npy", vol[1] > 0)
            np.save(mp / "marker" / f"case{i}.npy", vol[1])
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["evaluate", "--maps", str(maps), "--masks", str(masks), "--out", str(out),
                                 "--n-boot", "100"])
    assert r.exit_code == 0, r.output
    rows = {row["img_id"]: row for row in csv.DictReader(open(out / "hitrate_results.csv"))}
    assert rows["case0"]["nodule"] == "1.0" and rows["case1"]["nodule"] == "0.0" and rows["case3"]["nodule"] == ""
    assert rows["case2"]["marker"] == "1.0"
    summary = {s["name"]: s for s in csv.DictReader(open(out / "hitrate_summary_results.csv"))}
    assert math.isclose(float(summary["nodule"]["point"]), 2 / 3)
    assert float(summary["nodule"]["mean"]) == float(summary["nodule"]["bs_mean"])   # CheXlocalize's default
    assert (out / "miou_tp_fp_fn_summary_results.csv").exists()
    r = CliRunner().invoke(app, ["evaluate", "--maps", str(maps), "--masks", str(masks), "--out", str(out),
                                 "--metric", "miou", "--threshold", "tuned", "--val-maps", str(val_maps),
                                 "--val-masks", str(val_masks), "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    assert [row["task"] for row in csv.DictReader(open(out / "tuning_results.csv"))] == ["marker", "nodule"]
    (maps / "nodule" / "case2.npy").unlink()
    r = CliRunner().invoke(app, ["evaluate", "--maps", str(maps), "--masks", str(masks), "--out", str(out)])
    assert r.exit_code == 2 and "without a map" in r.output


def test_evaluate_cli_ties_option(tmp_path):
    from typer.testing import CliRunner

    from medexplain.cli import app
    maps, masks, out = tmp_path / "maps", tmp_path / "masks", tmp_path / "out"
    maps.mkdir(), masks.mkdir()
    m = np.zeros((1, 6, 6))
    m[0, :3, :3] = 1.0                                          # a constant 3x3 block at the maximum
    gt = np.zeros((6, 6), bool)
    gt[2, 2] = True                                             # in the block, not its first pixel
    np.save(maps / "case0.npy", m), np.save(masks / "case0.npy", gt)
    hits = {}
    for ties in ("first", "any"):
        r = CliRunner().invoke(app, ["evaluate", "--maps", str(maps), "--masks", str(masks), "--out", str(out),
                                     "--metric", "hitrate", "--n-boot", "10", "--ties", ties])
        assert r.exit_code == 0, r.output
        hits[ties] = [row for row in csv.DictReader(open(out / "hitrate_results.csv"))][0]
    assert list(hits["first"].values())[1:] == ["0.0"] and list(hits["any"].values())[1:] == ["1.0"]
    r = CliRunner().invoke(app, ["evaluate", "--maps", str(maps), "--masks", str(masks), "--ties", "all"])
    assert r.exit_code == 2 and "--ties" in r.output
