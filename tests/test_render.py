"""The one renderer (medexplain.io.render): robust colour scale, colormaps by sign, colour images in colour,
RAS tri-planar views with the radiological layout, readable figure sizes, and the PNG writer using it."""
import numpy as np
import pytest
import torch
from PIL import Image

from medexplain import io
from medexplain.io import render


def test_colour_limit_is_a_high_percentile_not_the_single_largest_value():
    g = np.random.default_rng(0)
    grad = np.abs(g.standard_cauchy((64, 64)))            # heavy-tailed, like a gradient map
    s = render.map_scale(grad)
    assert not s.signed and s.percentile == render.PERCENTILE
    assert s.limit == pytest.approx(np.percentile(grad, 99)) and s.limit < s.abs_max / 5
    assert f"{s.limit:.3g}" in s.text() and f"{s.abs_max:.3g}" in s.text() and "99th percentile" in s.text()
    # visible (> 20 % of full colour): with max scaling 1 voxel of 4096 (0.02 %), with the percentile 5.5 %
    assert (grad / s.abs_max > 0.2).mean() < 0.001 and (np.clip(grad / s.limit, 0, 1) > 0.2).mean() > 0.04
    sparse = np.zeros((100, 100))
    sparse[:5, :10] = np.linspace(0.01, 1.0, 50).reshape(5, 10)   # non-zero on 0.5 %: percentile of the support
    s2 = render.map_scale(sparse)
    assert s2.of_nonzero and s2.limit == pytest.approx(np.percentile(sparse[sparse > 0], 99))
    assert "over its non-zero pixels" in s2.text()
    one = np.zeros((50, 50))
    one[3, 4] = -2.0                                      # a single non-zero voxel: the max
    s1 = render.map_scale(one)
    assert s1.signed and s1.limit == 2.0 and s1.percentile is None and "maximum" in s1.text()
    assert render.map_scale(np.zeros((3, 3))).text() == "the map is zero everywhere"


def test_overlay_colours_by_sign_and_keeps_colour_images():
    grey = np.full((2, 2, 3), 128, np.uint8)
    ov = render.overlay(grey, np.array([[-1.0, 0.0], [0.0, 1.0]]))
    assert ov[0, 0, 2] > ov[0, 0, 0] and ov[1, 1, 0] > ov[1, 1, 2]        # RdBu_r: blue negative, red positive
    assert tuple(ov[0, 1]) == (128, 128, 128)                              # zero stays transparent
    seq = render.overlay(grey, np.array([[0.0, 1.0]]))
    assert seq[0, 1, 0] > seq[0, 1, 2] and tuple(seq[0, 0]) == (128, 128, 128)
    rgb = np.zeros((3, 4, 4))
    rgb[0] = 1.0                                                             # a red image
    shown = render.image_rgb(rgb)
    assert (shown[..., 0] == 255).all() and (shown[..., 1:] == 0).all()     # shown in colour, not grey
    assert np.array_equal(render.overlay(shown, np.zeros((4, 4))), shown)


def _lps_volume():
    """A volume whose first index runs to the patient's Left and second to Posterior (DICOM-like), with a
    marker at the most right, anterior, superior voxel."""
    affine = np.array([[-2.0, 0, 0, 30], [0, -1.5, 0, 20], [0, 0, 3.0, -40], [0, 0, 0, 1]])  # i -> L, j -> P, k -> S
    vol = np.zeros((1, 10, 12, 14))
    vol[0, 0, 0, 13] = 1.0                               # i = 0: most Right; j = 0: most Anterior; k = 13: top
    return vol, affine


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1)])
def test_planes_are_ras_in_the_radiological_layout(perm):
    vol, affine = _lps_volume()
    vol = np.transpose(vol, (0, *[1 + p for p in perm]))     # store the axes in another order ...
    affine = affine.copy()
    affine[:, :3] = affine[:, :3][:, list(perm)]              # ... with the affine that says so
    ras, aff, ornt = render.to_ras(vol, affine)
    assert ras.shape[1:] == (10, 12, 14) and np.allclose(np.diag(aff)[:3] > 0, True)
    peak = render.peak_index(ras[0])
    assert peak == (9, 11, 13)                               # the right-anterior-superior corner in RAS
    orig_peak = render.peak_index(vol[0])
    assert render.ras_index(orig_peak, ornt, vol.shape[1:]) == peak
    for name in render.PLANES:
        p = render.plane(ras, name, peak[render.PLANES[name]["axis"]])[0]
        # axial/coronal: patient's right on the viewer's left; A or S up; sagittal: A left, S up
        assert np.unravel_index(p.argmax(), p.shape) == (0, 0), name
        assert render.crosshair(peak, ras.shape[1:], name) == (0, 0)
    assert render.PLANES["axial"]["labels"] == ("R", "L", "A", "P")


def test_figures_are_readable_and_the_png_writer_uses_the_renderer(tmp_path):
    g = torch.Generator().manual_seed(0)
    img2, m2 = torch.rand(1, 24, 32, generator=g), torch.randn(1, 24, 32, generator=g)
    fig = render.figure(img2, m2, title="saliency \u00b7 target 1 \u00b7 model m", label="saliency")
    shown = fig.axes[0].images[0].get_array()
    assert np.array_equal(shown, render.overlay(render.image_rgb(img2.numpy()), m2[0].numpy(), render.map_scale(m2[0])))
    p = io.write_png_overlay(img2, m2, tmp_path / "a.png", title="saliency \u00b7 target 1 \u00b7 model m")
    w, h = Image.open(p).size
    panel = fig.axes[0].get_window_extent()
    assert max(panel.width, panel.height) >= render.MIN_PX and max(w, h) >= render.MIN_PX
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "saliency \u00b7 target 1 \u00b7 model m" in texts and "99th percentile" in texts
    assert len(fig.axes) == 2                                                 # the image and the colour bar
    vol, affine = _lps_volume()
    fig3 = render.figure(np.random.default_rng(0).random((1, 10, 12, 14)), vol, affine=affine, title="t")
    titles = [a.get_title() for a in fig3.axes]
    assert [t.split()[0] for t in titles[:3]] == ["axial", "coronal", "sagittal"] and len(fig3.axes) == 4
    assert all(max(a.get_window_extent().width, a.get_window_extent().height) > 0 for a in fig3.axes[:3])
    labels = {t.get_text() for a in fig3.axes[:3] for t in a.texts}
    assert labels == set("RLAPSI")
    texts = " ".join(t.get_text() for t in fig3.texts)
    assert "peak of |map|" in texts and "RAS (" in texts
    rgb = np.zeros((3, 20, 20))
    rgb[1] = 1.0                                                               # a green image, zero map
    arr = np.asarray(Image.open(io.write_png_overlay(rgb, np.zeros((1, 20, 20)), tmp_path / "g.png")).convert("RGB"))
    green = (arr[..., 1] > 200) & (arr[..., 0] < 50) & (arr[..., 2] < 50)
    assert green.sum() > 0.3 * render.MIN_PX ** 2                             # drawn in colour, large


# --- issue 25: figures that show the evidence ----------------------------------------------------------
def _coloured(fig, ax) -> np.ndarray:
    """The rendered pixels of one axes of ``fig``: True where coloured (not grey)."""
    import io as _io
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)                           # as io.write_png_overlay writes it
    rgb = np.asarray(Image.open(buf).convert("RGB")).astype(int)
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = ax.get_position().extents                             # figure fractions, origin bottom left
    crop = rgb[int(h * (1 - y1)) + 1:int(h * (1 - y0)) - 1, int(w * x0) + 1:int(w * x1) - 1]
    return (crop.max(-1) - crop.min(-1)) > 40


def test_a_sparse_map_on_a_full_size_radiograph_stays_visible():
    """1955x1841 (pydicom-data's RG1_UNCR.dcm size): a map non-zero on 0.05 % of the pixels (all of them in its
    top 1 % of |map|) is reduced 2x2 for display; every block holding a pixel of the support shows colour."""
    h, w = 1955, 1841
    g = np.random.default_rng(0)
    img = np.linspace(0, 1, h)[:, None] * np.ones((1, w))                  # grey ramp: any colour is the map's
    amap = np.zeros((h, w))
    idx = g.choice(h * w, size=int(0.0005 * h * w), replace=False)
    amap.flat[idx] = g.uniform(1.0, 2.0, idx.size)
    fig = render.figure(img[None], amap[None])
    seen = _coloured(fig, fig.axes[0])
    factor = int(np.ceil(max(h, w) / render.MAX_PX))
    assert factor == 2
    blocks = {(i // w // factor, i % w // factor) for i in idx}           # display blocks holding support
    assert seen.sum() >= 0.9 * len(blocks), (seen.sum(), len(blocks))
    assert seen.mean() < 0.05                                              # ... and not the whole panel
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "reduced by 2x2 blocks, each showing its largest" in texts                    # the caption says so


def test_block_reduce_keeps_the_signed_value_of_largest_magnitude():
    img = np.arange(16, dtype=float).reshape(1, 4, 4)
    m = np.zeros((4, 4))
    m[0, 1], m[1, 0], m[3, 3] = 0.5, -2.0, 1.0
    im_r, m_r = render.block_reduce(img, m, 2)
    assert m_r.tolist() == [[-2.0, 0.0], [0.0, 1.0]]
    assert im_r[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    _, m3 = render.block_reduce(img[:, :3, :3], m[:3, :3], 2)                         # ragged edges are padded with zeros
    assert m3.shape == (2, 2) and m3[0, 0] == -2.0


def test_volume_planes_pass_through_the_region_centre_and_mark_a_peak_elsewhere():
    vol = np.zeros((1, 20, 22, 24))
    amap = np.zeros((20, 22, 24))
    amap[16, 18, 20] = 5.0                                                   # the peak, far from the region
    amap[4:9, 5:10, 6:11] = 1.0
    region = np.zeros((20, 22, 24), bool)
    region[4:9, 5:10, 6:11] = True                                           # centre (6, 7, 8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])                                   # RAS: indices are RAS voxels
    panels, where = render._panels_3d(vol, amap, affine, None, True, region, tuple(render.PLANES))
    assert [p["name"].split("(")[1] for p in panels] == ["z = 8)", "y = 7)", "x = 6)"]
    assert render.region_centre(region) == (6, 7, 8)
    assert "centre of the explained region" in where
    assert "lies outside the axial and coronal and sagittal planes" in where
    two = region.copy()
    two[14:16, 1:3, 1:3] = True                                              # a second, smaller part far away
    assert render.region_centre(two) == (6, 7, 8)                            # the largest part's centre
    assert all(p["peak"] is not None for p in panels) and all(p["region"].any() for p in panels)
    fig = render.figure(vol, amap[None], affine=affine, region=region)
    rings = [ln for ax in fig.axes[:3] for ln in ax.lines if ln.get_marker() == "o"]
    assert len(rings) == 3
    # without a region the planes go through the peak, and nothing is marked
    panels, where = render._panels_3d(vol, amap, affine, None, True, None, ("axial",))
    assert panels[0]["name"].endswith("(z = 20)") and panels[0]["peak"] is None and "peak of |map|" in where


def test_two_d_dicom_edge_letters_come_from_patient_orientation(tmp_path):
    from medexplain import examples
    assert render.patient_orientation_labels(("L", "F")) == ("R", "L", "S", "I")
    assert render.patient_orientation_labels(("P", "H")) == ("A", "P", "I", "S")
    assert render.patient_orientation_labels(("LP", "F")) == ("RA", "LP", "S", "I")
    assert render.patient_orientation_labels(None) is None and render.patient_orientation_labels(("X", "F")) is None
    img, meta = io.read_image(examples.path("chest_xray"))                  # PatientOrientation L\F, no IOP
    assert meta["patient_orientation"] == ("L", "F") and not meta["oriented"]
    small = img[:, ::16, ::16]
    fig = render.figure(small, torch.rand_like(small), affine=meta["affine"], oriented=meta["oriented"],
                        patient_orientation=meta["patient_orientation"])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["I", "L", "R", "S"]
    fig = render.figure(small, torch.rand_like(small), affine=meta["affine"], oriented=False)
    assert not fig.axes[0].texts


def test_figure_options_are_typed_and_checked():
    from medexplain.errors import OptionError
    assert render.figure_options(["alpha=0.3", "cmap=viridis", "planes=axial,sagittal", "point=1,2,3",
                                  "percentile=99.5"]) == {"alpha": 0.3, "cmap": "viridis",
                                                          "planes": ("axial", "sagittal"), "point": (1, 2, 3),
                                                          "percentile": 99.5}
    for bad, match in (["opacity=0.3"], "unknown figure option"), (["alpha=2"], "alpha"), \
                      (["cmap=nope"], "unknown colour map"), (["planes=top"], "planes"), (["alpha"], "key=value"):
        with pytest.raises(OptionError, match=match):
            render.figure_options(bad)
    vol = np.random.default_rng(0).random((1, 8, 9, 10))
    fig = render.figure(vol, vol, affine=np.eye(4), planes=("axial",), cmap="viridis", alpha=0.2)
    assert len(fig.axes) == 2                                                # one panel and the colour bar


def test_instance_figures_one_png_per_lesion_through_its_centre(tmp_path):
    img = np.random.default_rng(0).random((2, 16, 16, 16))
    masks = [np.zeros((16, 16, 16), bool) for _ in range(2)]
    masks[0][2:5, 2:5, 2:5] = True
    masks[1][10:14, 9:12, 11:15] = True
    maps = [np.random.default_rng(k).random((2, 16, 16, 16)) for k in range(2)]
    paths = [io.write_figure(fig, tmp_path / name) for name, fig in
             render.instance_figures(img, maps, masks, ["TP", "FP"], affine=np.eye(4), channel_names=["T1", "FLAIR"])]
    assert [p.name for p in paths] == ["instance_001_TP.png", "instance_002_FP.png"]
    assert all(Image.open(p).size[0] > 1000 for p in paths)
