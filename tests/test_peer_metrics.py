"""The peer metrics (issue 19) against Quantus 0.6 (pytorch-grad-cam for average drop / increase in confidence)
on 2D classification with the same perturbation draws, to 1e-5; then on a 3D segmenter with a Region target."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import medexplain as mx
from conftest import TinyClassifier, image, import_pytorch_grad_cam, make
from medexplain import metrics as M
from medexplain.engine.targets import MultiLabel, Region
from medexplain.errors import TargetError

quantus = pytest.importorskip("quantus")
B = 3


class Recorder(nn.Module):
    """The model, recording every input batch it sees (to compare the perturbed images themselves)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.fixture(scope="module")
def case():
    """A float32 one-channel classifier (Quantus runs models in float32 and assumes one map per element),
    12x12 images, random continuous maps (no ties), and targets = the model's predictions."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = TinyClassifier(2, cin=1).float().eval()
    x = image(2, b=B, dtype=torch.float32)[:, :1] * 2
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    a = torch.from_numpy(np.random.RandomState(0).randn(B, 1, 12, 12).astype(np.float32))
    return model, x, y, a


def qexplain(method):
    def fn(model, inputs, targets, **kw):
        return mx.explain(model, torch.as_tensor(inputs).float(), method, target=[int(t) for t in targets]).map.numpy()
    return fn


def close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ ROAD


def test_noisy_linear_imputation_equals_quantus_in_2d_and_solves_the_mean_equations_in_3d():
    from quantus.functions.perturb_func import noisy_linear_imputation as q_nli
    x = image(2, b=1)
    idx = np.random.RandomState(1).choice(144, 100, replace=False)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask.view(-1)[torch.from_numpy(idx)] = True
    ours = M.noisy_linear_imputation(x, mask)
    close(ours[0].numpy(), q_nli(x[0].numpy(), idx, noise=0.0), 1e-8)
    assert torch.equal(ours[~mask.expand_as(x)], x[~mask.expand_as(x)])
    # 3D: each imputed voxel is the weighted mean of its in-image neighbours (face 4, edge 2, corner 1)
    v = image(3, b=2)
    m3 = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    out = M.noisy_linear_imputation(v, m3)
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    w = torch.einsum("i,j,k->ijk", k, k, k)
    w[1, 1, 1] = 0
    w = w.view(1, 1, 3, 3, 3)
    num = nn.functional.conv3d(out.reshape(-1, 1, 8, 8, 8), w, padding=1)
    den = nn.functional.conv3d(torch.ones(1, 1, 8, 8, 8, dtype=torch.float64), w, padding=1)
    mean = (num / den).view_as(out)
    mm = m3.expand_as(out)
    assert (out[mm] - mean[mm]).abs().max() < 1e-8
    assert (out[mm] - v[mm]).abs().max() > 0.1  # the imputation really replaced the values


def test_road_equals_quantus_with_the_same_draws(case):
    """On a max-pooling classifier whose prediction changes as voxels are imputed (so the curve moves)."""
    from quantus.functions.perturb_func import noisy_linear_imputation as q_nli
    _, _, _, a = case
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 5, padding=2), nn.AdaptiveMaxPool2d(1), nn.Flatten()).eval()
    x = image(2, b=B, dtype=torch.float32, seed=2)[:, :1] * 2
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    pct, noise, seed = [1, 11, 31, 51, 71, 91, 99], 0.05, 3
    draws = M.road_draws(x, 2 * len(pct), seed).numpy()
    calls = [0]

    def perturb(arr, indices, **kw):  # Quantus's imputation plus our draws at the imputed entries
        j = calls[0] // B
        calls[0] += 1
        out = q_nli(arr, indices, noise=0.0).reshape(arr.shape[0], -1)
        out[:, indices] += noise * draws[j].reshape(arr.shape[0], -1)[:, indices]
        return out.reshape(arr.shape)

    qrec, orec = Recorder(model).eval(), Recorder(model).eval()
    ref = quantus.ROAD(percentages=pct, perturb_func=perturb, disable_warnings=True)(
        model=qrec, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu")
    ours = M.road(orec, x, a, y.tolist(), percentages=pct, noise=noise, seed=seed, orders=("morf",))
    close(ours.morf_accuracy.numpy(), list(ref.values()))
    assert min(ref.values()) < max(ref.values()) == 1.0         # the curve really moves
    q_images = torch.cat(qrec.seen[1:] if len(qrec.seen) > len(pct) else qrec.seen)
    close(torch.cat(orec.seen).numpy(), q_images.numpy())         # the very same perturbed images
    lerf = M.road(model, x, a, y.tolist(), percentages=pct, noise=noise, seed=seed)
    assert torch.equal(lerf.morf_correct, ours.morf_correct) and torch.isfinite(lerf.lerf_score).all()


# ------------------------------------------------------------------------------------ other faithfulness


def test_faithfulness_correlation_equals_quantus_with_the_same_subsets(case, monkeypatch):
    model, x, y, a = case
    subsets = M.random_subsets(144, 20, 15, seed=4).numpy()
    calls = [0]

    def choice(n, size, replace=True):
        calls[0] += 1
        return subsets[(calls[0] - 1) // B]
    monkeypatch.setattr(np.random, "choice", choice)
    ref = quantus.FaithfulnessCorrelation(nr_runs=15, subset_size=20, return_aggregate=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu")
    monkeypatch.undo()
    ours = M.faithfulness_correlation(model, x, a, y.tolist(), n_runs=15, subset_size=20, seed=4, chunk_size=7)
    close(ours.numpy(), ref)


def test_monotonicity_equals_quantus_given_an_inserting_perturbation(case):
    model, x, y, a = case
    flat = x.numpy().reshape(B, -1)

    def insert(arr, indices, **kw):  # put the input's values at the indices (Arya et al.'s insertion)
        out = arr.copy()
        out[np.arange(B)[:, None], indices] = flat[np.arange(B)[:, None], indices]
        return out

    for step in (8, 24):
        ref = quantus.Monotonicity(features_in_step=step, perturb_func=insert, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu")
        ours = M.monotonicity(model, x, a, y.tolist(), features_in_step=step)
        close(ours.monotonic.numpy(), np.asarray(ref, dtype=float))
    # Quantus's default perturbation writes the baseline over the baseline: True whatever the explanation
    default = quantus.Monotonicity(features_in_step=8, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu")
    assert all(default)
    assert not M.monotonicity(model, x, a, y.tolist(), features_in_step=8).monotonic.all()


def test_infidelity_blocks_equal_quantus_and_noise_equals_the_definition_by_hand(case):
    model, x, y, a = case
    ref = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu")
    ours = M.infidelity(model, x, a, y.tolist(), patch_size=4, chunk_size=5)
    close(ours.numpy(), ref)
    noisy = M.infidelity(model, x, a, y.tolist(), perturbation="noise", n_samples=6, sigma=0.2, seed=5, chunk_size=4)
    n, pert = M.infidelity_perturbations(x, "noise", n_samples=6, sigma=0.2, seed=5)
    with torch.no_grad():
        fx = model(x)[np.arange(B), y]
        terms = [((a * pert(j)).flatten(1).sum(1) - (fx - model(x - pert(j))[np.arange(B), y])) ** 2 for j in range(n)]
    close(noisy.numpy(), torch.stack(terms).mean(0).numpy())


def test_average_drop_and_increase_equal_pytorch_grad_cam(case):
    """Against pytorch-grad-cam's DropInConfidence / IncreaseInConfidence (imported past its torchvision import)."""
    import_pytorch_grad_cam()
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    model, x, y, a = case
    ours = M.average_drop_increase(model, x, a, y.tolist())
    cams = mx.normalize(a, "minmax")[:, 0].numpy()
    tgts = [ClassifierOutputSoftmaxTarget(int(c)) for c in y]
    drop = DropInConfidence()(x, cams, tgts, model)             # absolute drop max(0, Y - O)
    inc = IncreaseInConfidence()(x, cams, tgts, model)
    close((ours.drop * ours.score).numpy(), drop.ravel())
    close(ours.increase.numpy(), inc.ravel())
    assert 0 <= ours.average_drop <= 100 and ours.increase_in_confidence in (0.0, 100 / 3, 200 / 3, 100.0)


# ------------------------------------------------------------------------------------------- robustness


def test_max_sensitivity_equals_quantus_with_the_same_draws(case, monkeypatch):
    model, x, y, a = case
    draws = M.sensitivity_draws(x, 5, 0.2, seed=7).numpy()
    calls = [0]

    def uniform(low=0.0, high=1.0, size=None):
        calls[0] += 1
        return np.broadcast_to(draws[calls[0] - 1].reshape(1, -1), size).copy()
    amap = mx.explain(model, x, "saliency", target=y.tolist()).map
    monkeypatch.setattr(np.random, "uniform", uniform)
    ref = quantus.MaxSensitivity(nr_samples=5, lower_bound=0.2, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=amap.numpy(), explain_func=qexplain("saliency"), device="cpu")
    monkeypatch.undo()
    ours = M.max_sensitivity(model, x, "saliency", y.tolist(), n_samples=5, radius=0.2, seed=7, chunk_size=6)
    close(ours.numpy(), ref)


# ---------------------------------------------------------------------------------------- randomisation


def test_smooth_mprt_equals_quantus_with_the_same_noise(case, monkeypatch):
    model, x, y, _ = case
    n = 4
    gen = torch.Generator().manual_seed(0)              # NoiseSource's standard-normal draws for seed 0
    std = [torch.randn(x.shape[1:], generator=gen, dtype=x.dtype).numpy() for _ in range(n - 1)]
    calls = [0]

    def randn(*shape):
        calls[0] += 1
        return np.broadcast_to(std[(calls[0] - 1) % (n - 1)], shape).astype(np.float64)
    monkeypatch.setattr(np.random, "randn", randn)
    ref = quantus.SmoothMPRT(nr_samples=n, noise_magnitude=0.1, seed=42, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=qexplain("saliency"), device="cpu")
    monkeypatch.undo()
    ours = M.smooth_mprt(model, x, "saliency", y.tolist(), n_samples=n, noise_magnitude=0.1, seed=42, noise_seed=0)
    assert ours.layers == [k for k in ref if k != "original"]
    close(ours.similarity.numpy(), np.array([ref[k] for k in ours.layers]))
    close(ours.original.numpy(), ref["original"])
    last = M.smooth_mprt(model, x, "saliency", y.tolist(), n_samples=n, seed=42, cascade=False)
    assert last.layers == ["fc"] and torch.allclose(last.last, ours.last)


def test_efficient_mprt_equals_quantus(case):
    model, x, y, _ = case
    ref = quantus.EfficientMPRT(seed=42, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=qexplain("saliency"), device="cpu")
    ours = M.efficient_mprt(model, x, "saliency", y.tolist(), seed=42)
    close(ours.score.numpy(), ref)


def test_random_logit_equals_quantus_with_the_same_off_class(case, monkeypatch):
    model, x, y, _ = case
    amap = mx.explain(model, x, "saliency", target=y.tolist()).map
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size: np.full(size, 1))   # the 2nd other class
    ref = quantus.RandomLogit(num_classes=3, seed=42, normalise=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=amap.numpy(), explain_func=qexplain("saliency"), device="cpu")
    monkeypatch.undo()
    off = [1 + (1 >= c) for c in y]
    ours = M.random_logit(model, x, "saliency", y.tolist(), off_class=off, normalise=False, flatten=True)
    close(ours.numpy(), ref)
    drawn = M.random_logit(model, x, "saliency", y.tolist())      # the default: a seeded draw, images as images
    assert drawn.shape == (B,) and torch.isfinite(drawn).all()


# --------------------------------------------------------------------------------- 3D segmenter, Region


def test_every_metric_runs_on_a_3d_segmenter_with_a_region_target_and_a_batch_equals_its_samples_one_by_one():
    model, x = make("seg", 3, dtype=torch.float32), image(3, b=2, dtype=torch.float32)  # float64 conv3d is slow on CPU
    mask = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 2:5, 2:5] = True
    mask[1, 5:7, 5:7, 5:7] = True
    tgt = Region(1, mask)
    maps = mx.explain(model, x, "saliency", target=tgt).map

    def one(i):
        return Region(1, mask[i:i + 1])
    runs = {
        "road": lambda xx, mm, t: M.road(model, xx, mm, t, percentages=[10, 50, 90], chunk_size=4).morf_score,
        "average_drop_increase": lambda xx, mm, t: M.average_drop_increase(model, xx, mm, t).drop,
        "faithfulness_correlation": lambda xx, mm, t: M.faithfulness_correlation(model, xx, mm, t, n_runs=8, subset_size=64),
        "monotonicity": lambda xx, mm, t: M.monotonicity(model, xx, mm, t, features_in_step=64).curves,
        "infidelity": lambda xx, mm, t: M.infidelity(model, xx, mm, t, patch_size=4),
        "max_sensitivity": lambda xx, mm, t: M.max_sensitivity(model, xx, "saliency", t, n_samples=2),
        "smooth_mprt": lambda xx, mm, t: M.smooth_mprt(model, xx, "saliency", t, n_samples=2, cascade=False).similarity,
        "efficient_mprt": lambda xx, mm, t: M.efficient_mprt(model, xx, "saliency", t).score,
        "random_logit": lambda xx, mm, t: M.random_logit(model, xx, "saliency", t),
    }
    assert set(runs) == set(M.available_metrics(tgt))
    for name, run in runs.items():
        full = run(x, maps, tgt)
        parts = torch.cat([run(x[i:i + 1], maps[i:i + 1], one(i)) for i in range(2)], dim=1 if name == "smooth_mprt" else 0)
        assert torch.isfinite(full).all(), name
        torch.testing.assert_close(full.double(), parts.double(), rtol=1e-5, atol=1e-6, msg=name)
    road = M.road(model, x, maps, tgt, percentages=[10, 50, 90])
    assert torch.isfinite(road.morf_correct).all() and torch.isfinite(road.lerf_auc).all()


def test_metric_metadata_declares_direction_and_applicability():
    names = M.available_metrics()
    assert set(names) == {"road", "average_drop_increase", "faithfulness_correlation", "monotonicity", "infidelity",
                          "max_sensitivity", "smooth_mprt", "efficient_mprt", "random_logit"}
    lower = {"road", "average_drop_increase", "infidelity", "max_sensitivity", "smooth_mprt", "random_logit"}
    for n in names:
        info = M.metric_info(n)
        assert info.higher_is_better == (n not in lower), n
        assert set(info.applies_to) <= {"Class", "MultiLabel", "Region"} and info.peer and info.reference
    assert "random_logit" not in M.available_metrics(MultiLabel([0, 1]))
    model, x = make("cls", 2), image(2, b=1)
    with pytest.raises(TargetError, match="random_logit"):
        M.random_logit(model, x, "saliency", MultiLabel([0, 1]))


def test_every_metric_takes_the_model_object_and_runs_it_window_by_window():
    """An ``mx.Model`` with an inferer gives the result of the network wrapped in that sliding-window inferer
    (and not that of the plain network, whose padding differs at the window borders); no metric takes
    ``inferer=`` beside the model any more."""
    import inspect

    from monai.inferers import SlidingWindowInferer

    from medexplain.engine.sliding import with_inferer
    model, x = make("seg", 3, dtype=torch.float32), image(3, b=1, dtype=torch.float32)
    inferer = SlidingWindowInferer(roi_size=(4, 4, 4), overlap=0.0)
    mask = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6, 2:6] = True
    tgt = Region(1, mask)
    maps = mx.explain(model, x, "saliency", target=tgt).map
    runs = {
        "road": lambda m, **k: M.road(m, x, maps, tgt, percentages=[10, 50], **k).morf_score,
        "average_drop_increase": lambda m, **k: M.average_drop_increase(m, x, maps, tgt, **k).drop,
        "faithfulness_correlation": lambda m, **k: M.faithfulness_correlation(m, x, maps, tgt, n_runs=4, subset_size=32, **k),
        "monotonicity": lambda m, **k: M.monotonicity(m, x, maps, tgt, features_in_step=128, **k).curves,
        "infidelity": lambda m, **k: M.infidelity(m, x, maps, tgt, patch_size=4, **k),
        "max_sensitivity": lambda m, **k: M.max_sensitivity(m, x, "saliency", tgt, n_samples=2, **k),
        "smooth_mprt": lambda m, **k: M.smooth_mprt(m, x, "saliency", tgt, n_samples=2, cascade=False, **k).similarity,
        "efficient_mprt": lambda m, **k: M.efficient_mprt(m, x, "saliency", tgt, **k).score,
        "random_logit": lambda m, **k: M.random_logit(m, x, "saliency", tgt, **k),
    }
    assert set(runs) == set(M.available_metrics(tgt))
    differs = []
    for name, run in runs.items():
        assert not {"inferer", "output", "activation"} & set(inspect.signature(getattr(M, name)).parameters), name
        windowed = run(mx.Model(model, inferer=inferer))
        torch.testing.assert_close(windowed, run(with_inferer(model, inferer)), msg=name)
        differs.append(not torch.allclose(windowed.double(), run(model).double()))
    assert sum(differs) >= 5, differs
