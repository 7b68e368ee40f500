"""Planted-evidence generators: determinism, shapes, and that masks are where the evidence was planted."""
import pytest
import torch
from scipy import ndimage

from medexplain import data
from medexplain.errors import InputError

GENERATORS = [
    (data.chest_xray, dict(n=6, size=32), (1, 32, 32)),
    (data.fundus, dict(n=4, size=32), (3, 32, 32)),
    (data.lesion_volumes, dict(n=2, size=16), (2, 16, 16, 16)),
    (data.contrast_volumes, dict(n=2, size=16), (4, 16, 16, 16)),
]


@pytest.mark.parametrize("gen,kw,shape", GENERATORS, ids=lambda v: getattr(v, "__name__", ""))
def test_shapes_dtypes_and_determinism(gen, kw, shape):
    a, b = gen(seed=3, **kw), gen(seed=3, **kw)
    n = kw["n"]
    assert a.images.shape == (n, *shape) and a.images.dtype == torch.float32
    assert a.masks.shape == (n, *shape[1:]) and a.masks.dtype == torch.bool
    assert a.marker_masks.shape == a.masks.shape and len(a) == n and len(a.meta) == n
    assert torch.isfinite(a.images).all()
    # same seed: byte-identical arrays and metadata
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert torch.equal(a.masks, b.masks) and a.meta == b.meta
    if a.labels is not None:
        assert a.labels.dtype == torch.long and a.seg is None and a.task == "classification"
        assert torch.equal(a.labels, b.labels)
    else:
        assert a.seg.shape == a.masks.shape and a.seg.dtype == torch.long and a.task == "segmentation"
        assert torch.equal(a.seg.bool(), a.masks)


def _positions(ds):
    keys = ("nodules", "lesions")
    return [tuple(round(v, 6) for v in o["center"]) for m in ds.meta for k in keys for o in m.get(k, [])]


@pytest.mark.parametrize("gen,kw,shape", GENERATORS, ids=lambda v: getattr(v, "__name__", ""))
def test_different_seeds_give_different_positions(gen, kw, shape):
    a, b = gen(seed=0, **kw), gen(seed=1, **kw)
    assert _positions(a) and _positions(b)
    assert set(_positions(a)).isdisjoint(_positions(b))
    assert not torch.equal(a.images, b.images)


def test_chest_mask_is_the_half_maximum_disc_of_the_planted_blob():
    kw = dict(n=8, size=32, seed=5)
    ds = data.chest_xray(**kw)
    blank = data.chest_xray(amplitude=(0.0, 0.0), **kw)       # same draws, nothing planted
    diff = (ds.images - blank.images)[:, 0].double()
    assert torch.equal(ds.labels, blank.labels)
    for i, m in enumerate(ds.meta):
        if ds.labels[i] == 0:
            assert not ds.masks[i].any() and diff[i].abs().max() == 0
            continue
        (nod,) = m["nodules"]
        a, (cy, cx), r = nod["amplitude"], nod["center"], nod["radius"]
        assert 0.15 <= a <= 0.25
        assert diff[i].max() == pytest.approx(a, rel=0.05)       # peak at the recorded centre (sub-pixel)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() <= r
        assert torch.equal(ds.masks[i], inside)
        assert torch.equal(ds.masks[i], diff[i] >= a / 2 - 1e-6)  # mask == half-maximum support
        ys, xs = ds.masks[i].nonzero(as_tuple=True)
        assert abs(ys.double().mean() - cy) < 0.6 and abs(xs.double().mean() - cx) < 0.6
    assert ds.labels.sum() == 4                                  # balanced


def test_shortcut_marker_follows_the_label_and_the_nodule_is_weak():
    ds = data.chest_xray(n=10, size=32, seed=2, shortcut=True)
    has_marker = ds.marker_masks.flatten(1).any(1)
    assert torch.equal(has_marker, ds.labels == 1)
    for i in (ds.labels == 1).nonzero().flatten().tolist():
        y0, x0, y1, x1 = ds.meta[i]["marker"]["box"]
        assert ds.marker_masks[i].sum() == (y1 - y0) * (x1 - x0)
        assert torch.all(ds.images[i, 0][ds.marker_masks[i]] == 1.1)
        near_border = min(y0, x0, 32 - y1, 32 - x1) <= 2
        assert near_border
        assert ds.meta[i]["nodules"][0]["amplitude"] <= 0.25 * 0.3 + 1e-9
    # marker_rate can decorrelate it (e.g. a test set where the shortcut is absent)
    off = data.chest_xray(n=10, size=32, seed=2, shortcut=True, marker_rate=(0.0, 0.0))
    assert not off.marker_masks.any()


def test_fundus_lesions_are_inside_the_field_of_view():
    ds = data.fundus(n=6, size=32, seed=1)
    blank = data.fundus(n=6, size=32, seed=1, amplitude=(0.0, 0.0))
    diff = ds.images - blank.images
    for i in range(6):
        if ds.labels[i] == 1:
            assert ds.masks[i].any() and 1 <= len(ds.meta[i]["lesions"]) <= 3
            assert (blank.images[i].mean(0)[ds.masks[i]] > 0.05).all()   # on the retina, not the black border
            # yellowish: red gain > green > blue inside the mask
            d = diff[i][:, ds.masks[i]].mean(1)
            assert d[0] > d[1] > d[2] > 0
        else:
            assert not ds.masks[i].any() and diff[i].abs().max() == 0


def test_lesions_are_planted_in_channel_1_only_and_instances_are_separate():
    kw = dict(n=3, size=16, seed=4)
    ds = data.lesion_volumes(**kw)
    blank = data.lesion_volumes(amplitude=(0.0, 0.0), **kw)
    diff = ds.images - blank.images
    assert diff[:, 0].abs().max() == 0                            # channel 0 untouched
    assert (diff[:, 1][ds.masks] > 0.3).all()                     # hyperintense inside every lesion
    assert diff[:, 1][~ds.masks].mean() < 0.01
    struct = ndimage.generate_binary_structure(3, 2)               # 18-connectivity, as the IES reference
    for i in range(3):
        n_les = len(ds.meta[i]["lesions"])
        assert 2 <= n_les <= 5
        assert sorted(torch.unique(ds.instances[i]).tolist()) == list(range(n_les + 1))
        _, n_cc = ndimage.label(ds.seg[i].numpy(), structure=struct)
        assert n_cc == n_les
        for j, les in enumerate(ds.meta[i]["lesions"], start=1):
            assert (ds.instances[i] == j).sum() == les["voxels"]
    assert ds.meta_info["lesion_channel"] == 1


def test_contrast_volumes_carry_the_documented_visibility():
    kw = dict(n=2, size=16, seed=0)
    ds = data.contrast_volumes(**kw)
    blank = data.contrast_volumes(visibility=(0, 0, 0, 0), **kw)
    d = (ds.images - blank.images).double()
    assert d[:, 0].abs().max() == 0 and d[:, 1].abs().max() == 0
    m = ds.masks
    ratio = d[:, 2][m] / d[:, 3][m]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.35), atol=1e-4)
    assert ds.meta_info["true_ranking"] == [3, 2, 1, 0] and ds.meta_info["ranking_ties"] == [[0, 1]]
    other = data.contrast_volumes(visibility=(1.0, 0.0, 0.5, 0.0), **kw)
    assert other.meta_info["true_ranking"][:2] == [0, 2] and other.meta_info["ranking_ties"] == [[1, 3]]


def test_split_is_stratified_disjoint_and_deterministic():
    ds = data.chest_xray(n=20, size=16, seed=0)
    tr, te = ds.split(0.8)
    assert len(tr) == 16 and len(te) == 4
    assert tr.labels.sum() == 8 and te.labels.sum() == 2
    ids = lambda d: {tuple(m["view"]["centre"]) for m in d.meta}  # noqa: E731
    assert ids(tr).isdisjoint(ids(te))
    tr2, _ = ds.split(0.8)
    assert torch.equal(tr.images, tr2.images)
    seg_tr, seg_te = data.lesion_volumes(n=4, size=12, seed=0).split(0.75)
    assert len(seg_tr) == 3 and len(seg_te) == 1 and seg_tr.seg.shape[0] == 3
    with pytest.raises(InputError):
        ds.split(1.0)


@pytest.mark.parametrize("kw", [dict(n=0), dict(seed=-1), dict(size=4), dict(n=2.5)])
def test_bad_arguments_raise_typed_errors(kw):
    with pytest.raises(InputError):
        data.chest_xray(**{"n": 2, "size": 16, **kw})
