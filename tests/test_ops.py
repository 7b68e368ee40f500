"""medexplain.engine.ops, the shared tensor arithmetic: total variation, Dice, output probabilities and the
SmoothGrad noise source, each against a hand computation."""
import pytest
import torch

from medexplain.engine.ops import NoiseSource, dice, probabilities, total_variation
from medexplain.errors import InputError, TargetError


@pytest.mark.parametrize("nd", [2, 3])
def test_total_variation_sum_and_mean_of_a_cube(nd):
    t = torch.zeros((2, 1) + (6,) * nd, dtype=torch.float64)
    t[(0, 0) + (slice(1, 4),) * nd] = 1.0                   # a cube of side 3 away from the border
    faces = 2 * nd * 3 ** (nd - 1)                          # two jumps per line through the cube, every axis
    assert total_variation(t).tolist() == [faces, 0.0]
    assert total_variation(t, "mean").tolist() == pytest.approx([faces / 6 ** nd, 0.0])
    two = torch.cat([t[:1], 2 * t[:1]], 1)                  # channels add up
    assert total_variation(two).item() == 3 * faces
    assert total_variation(two, "mean").item() == pytest.approx(3 * faces / (2 * 6 ** nd))
    ramp = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 3)
    assert total_variation(ramp).item() == 4 * 3            # 4 unit steps down each of 3 columns
    with pytest.raises(InputError):
        total_variation(t, "max")
    with pytest.raises(InputError):
        total_variation(torch.zeros(4, 4))


def test_dice_bool_soft_and_empty():
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    ref = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2] = True                                      # 8 voxels
    ref[0, 1:3] = True                                      # 8 voxels, 4 shared
    ref[1, 0, 0] = True                                     # sample 1: a missed voxel; sample 2: both empty
    got = dice(pred, ref)
    assert got.dtype == torch.float64
    assert got.tolist() == [2 * 4 / 16, 0.0, 1.0]
    assert dice(pred, ref, empty=0.0).tolist() == [0.5, 0.0, 0.0]
    soft = pred.double() * 0.5                              # soft Dice: 2 sum(p g) / (sum p + sum g)
    assert dice(soft, ref.double()).tolist()[:2] == pytest.approx([2 * 2 / (4 + 8), 0.0])
    with pytest.raises(InputError, match="shape"):
        dice(pred, ref[:, :2])


def test_probabilities_auto_softmax_sigmoid_none_and_channel():
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(probabilities(z, "softmax"), torch.softmax(z, 1))
    torch.testing.assert_close(probabilities(z, "auto"), torch.softmax(z, 1))          # K > 1: softmax
    torch.testing.assert_close(probabilities(z, "sigmoid", channel=2), torch.sigmoid(z[:, 2]))
    torch.testing.assert_close(probabilities(z, "softmax", channel=1), torch.softmax(z, 1)[:, 1])
    assert torch.equal(probabilities(z, "none", channel=0), z[:, 0])
    assert torch.equal(probabilities(z, None), z)
    one = z[:, :1]
    torch.testing.assert_close(probabilities(one, "auto"), torch.sigmoid(one))          # K = 1: sigmoid
    logits = torch.tensor([[2.0, 0.0]], dtype=torch.float64)                           # a classifier
    torch.testing.assert_close(probabilities(logits, "softmax", channel=0), torch.softmax(logits, 1)[:, 0])
    with pytest.raises(TargetError, match="out of range"):
        probabilities(z, "softmax", channel=3)
    with pytest.raises(TargetError, match="activation"):
        probabilities(z, "relu")


def test_noise_source_batch_and_chunk_invariance():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 5, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 4.0, 9.0]).view(3, 1, 1, 1)
    full = NoiseSource(x, 7, 0.2, seed=3).take(7)                                       # (N, B, C, *s)
    assert full.shape == (7, 3, 2, 5, 5)
    for b in range(3):                                       # a batch of 3 = three batches of 1
        torch.testing.assert_close(full[:, b], NoiseSource(x[b:b + 1], 7, 0.2, seed=3).take(7)[:, 0])
    for per in (1, 2, 3, 7, 10):                             # any chunking gives the same draws
        parts = [noisy for _, noisy in NoiseSource(x, 7, 0.2, seed=3).chunks(per)]
        torch.testing.assert_close(torch.cat(parts) - x.unsqueeze(0), full)
    assert not torch.allclose(NoiseSource(x, 7, 0.2, seed=4).take(7), full)
    # one standard-normal draw per noise sample, scaled by each image's range: eps_b / sd_b is shared
    sd = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * 0.2
    unit = full / sd.view(1, 3, 1, 1, 1)
    torch.testing.assert_close(unit[:, 0], unit[:, 2])
    given = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(NoiseSource(x, 7, 0.2, noise=given).take(7), given.unsqueeze(1).expand(7, 3, 2, 5, 5))
    with pytest.raises(InputError, match="noise must have shape"):
        NoiseSource(x, 6, 0.2, noise=given)


def test_noise_source_channel0_scale():
    x = torch.rand(1, 2, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[:, 1] *= 100.0                                         # channel 1's range must not set the sd
    eps = NoiseSource(x, 400, 0.05, seed=0, scale="channel0").take(400)[:, 0]
    sd0 = 0.05 * float(x[0, 0].max() - x[0, 0].min())
    assert abs(float(eps[:, 0].std()) / sd0 - 1) < 0.03 and abs(float(eps[:, 1].std()) / sd0 - 1) < 0.03
    whole = NoiseSource(x, 400, 0.05, seed=0, scale="sample").take(400)[:, 0]
    sd = 0.05 * float(x.max() - x.min())
    assert abs(float(whole[:, 1].std()) / sd - 1) < 0.03
    torch.testing.assert_close(whole / sd, eps / sd0)                                  # same draws, other scale
    with pytest.raises(InputError):
        NoiseSource(x, 4, 0.05, scale="channel1")
    with pytest.raises(InputError):
        NoiseSource(x, 0, 0.05)
    with pytest.raises(InputError):
        NoiseSource(x, 4, -1.0)


def test_one_noise_loop():
    """``ops.noise_sum`` is the one SmoothGrad noise loop: it sums ``fn`` over the noisy copies drawn by
    ``NoiseSource`` in any chunking, adds onto ``start``, and every other module draws noise through it."""
    import ast
    from pathlib import Path

    from medexplain.engine.ops import noise_sum
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = (x.unsqueeze(0) + NoiseSource(x, 7, 0.2, 4).take(7)).sum(0)     # (B, C, *s), the draws summed
    for chunk in (None, 1, 4, 9):
        got = noise_sum(x, lambda rows, r, n: rows.view(n, *x.shape).sum(0), 7, 0.2, 4, chunk)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pair = noise_sum(x, lambda rows, r, n: (rows.view(n, *x.shape).sum(0), r.double().sum()), 7, 0.2, 4, 6,
                     start=(torch.ones_like(x), torch.zeros((), dtype=torch.float64)))
    torch.testing.assert_close(pair[0], want + 1)
    assert float(pair[1]) == 7 * (0 + 1 + 2)                               # each draw's rows name samples 0..2
    src = Path(__file__).resolve().parents[1] / "src" / "medexplain"
    users = {p.relative_to(src).as_posix() for p in src.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "NoiseSource"}
    assert users == {"engine/ops.py"}
