"""The one renderer (medexplain.render): robust colour scale, colormaps by sign, colour images in colour,
RAS tri-planar views with the radiological layout, readable figure sizes, and the PNG writer using it."""
import numpy as np
import pytest
import torch
from PIL import Image

from medexplain import io, render


def test_colour_limit_is_a_high_percentile_not_the_single_largest_value():
    g = np.random.default_rng(0)
    grad = np.abs(g.standard_cauchy((64, 64)))            # heavy-tailed, like a gradient map
    s = render.map_scale(grad)
    assert not s.signed and s.percentile == render.PERCENTILE
    assert s.limit == pytest.approx(np.percentile(grad, 99)) and s.limit < s.abs_max / 5
    assert f"{s.limit:.3g}" in s.text() and f"{s.abs_max:.3g}" in s.text() and "99th percentile" in s.text()
    # visible (> 20 % of full colour): with max scaling 1 voxel of 4096 (0.02 %), with the percentile 5.5 %
    assert (grad / s.abs_max > 0.2).mean() < 0.001 and (np.clip(grad / s.limit, 0, 1) > 0.2).mean() > 0.04
    one = np.zeros((50, 50))
    one[3, 4] = -2.0                                      # non-zero on < 1 %: the percentile is 0 -> the max
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
