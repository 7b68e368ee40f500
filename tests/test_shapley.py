"""Contrast-level Shapley values (medexplain.segmentation.shapley): exactness, known games, groups, baselines, sampling,
value functions, cost, batching, the model guard and errors."""

import pytest
import torch
from torch import nn

import medexplain as mx
from medexplain.errors import InputError, OptionError, TargetError, UnsupportedModelError
from medexplain.segmentation.shapley import channel_shapley, dice, mean_foreground_probability, shapley_weights


class GameModel(nn.Module):
    """Output (N, 1, *spatial) constant = a known cooperative game of the channels present.

    With input channels all ones and the zero baseline, m_c = mean(x_c) is 1 if channel c is present and
    0 if absent, so the output is v(S) = sum_i a_i [i in S] + sum_T c_T prod_{j in T} [j in S]:
    an additive game plus unanimity games, whose Shapley values are a_i + sum_{T contains i} c_T / |T|.
    """

    def __init__(self, additive, unanimity=()):
        super().__init__()
        self.a = torch.as_tensor(additive, dtype=torch.float64)
        self.unanimity = [(list(t), float(c)) for t, c in unanimity]
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))  # something for the guard to freeze

    def forward(self, x):
        m = x.flatten(2).mean(2).double()                        # (N, C)
        v = (m @ self.a) * self.scale
        for t, c in self.unanimity:
            v = v + c * m[:, t].prod(1)
        return v.view(-1, 1, *[1] * (x.ndim - 2)).expand(-1, 1, *x.shape[2:])


def game_value(out, rows=None):
    return out.flatten(1)[:, 0]


def textbook(additive, unanimity, n):
    phi = torch.tensor(additive, dtype=torch.float64).clone()
    for t, c in unanimity:
        for j in t:
            phi[j] += c / len(t)
    return phi[:n]


def small_unet(c_in=4, k=2, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(conv(c_in, 6, 3, padding=1), nn.Tanh(), conv(6, 6, 3, padding=1), nn.Tanh(),
                         conv(6, k, 1)).double()


@pytest.mark.parametrize("spatial", [(4, 4), (3, 4, 4)])
def test_known_games_give_textbook_values(spatial):
    additive = [0.5, -1.0, 2.0, 0.25]
    unanimity = [((0, 1), 3.0), ((1, 2, 3), 2.0)]
    model = GameModel(additive, unanimity)
    x = torch.ones(2, 4, *spatial, dtype=torch.float64)
    res = channel_shapley(model, x, game_value)
    expect = textbook(additive, unanimity, 4)
    torch.testing.assert_close(res.values, expect.expand(2, 4), rtol=0, atol=1e-12)
    # the interaction (unanimity) part alone: players in T share c_T, the others get nothing
    res = channel_shapley(GameModel([0, 0, 0, 0], [((0, 1), 3.0)]), x, game_value)
    torch.testing.assert_close(res.values[0], torch.tensor([1.5, 1.5, 0, 0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert res.ranking[0, 0].item() in (0, 1) and set(res.ranking[0, :2].tolist()) == {0, 1}


def test_weights_closed_form():
    # every row of W over the coalitions containing i sums to 1 (probability of the coalitions i joins)
    for n in (1, 2, 3, 5):
        w = shapley_weights(n)
        member = ((torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1).bool()
        torch.testing.assert_close(torch.where(member, w, 0.0).sum(0), torch.ones(n, dtype=torch.float64))
        assert torch.allclose(w.sum(0), torch.zeros(n, dtype=torch.float64), atol=1e-15)  # sum_S W[S,i] = 0


@pytest.mark.parametrize("dims", [2, 3])
def test_efficiency_float64(dims):
    model = small_unet(dims=dims)
    torch.manual_seed(1)
    x = torch.randn(3, 4, *([6] * dims), dtype=torch.float64)
    ref = torch.randint(0, 2, (3, *([6] * dims)))
    for v in (mean_foreground_probability(1), dice(1, ref, soft=True), dice(1, ref)):
        res = channel_shapley(model, x, v)
        full, empty = res.value_of([0, 1, 2, 3]), res.value_of([])
        assert (res.values.sum(1) - (full - empty)).abs().max() < 1e-6
        assert res.efficiency_gap().abs().max() < 1e-12
        assert res.values.abs().sum() > 0


def test_equals_captum_shapley_values():
    captum_attr = pytest.importorskip("captum.attr")
    model = small_unet()
    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    vf = mean_foreground_probability(1)

    def forward_func(inp):
        return vf(model(inp), torch.arange(inp.shape[0]) % 2)

    mask = torch.arange(4).view(1, 4, 1, 1, 1).expand_as(x).contiguous()
    ref = captum_attr.ShapleyValues(forward_func).attribute(x, baselines=0.0, feature_mask=mask)
    ours = channel_shapley(model, x, vf)
    torch.testing.assert_close(ours.values, ref[:, :, 0, 0, 0].double(), rtol=0, atol=1e-5)
    assert ours.n_evaluations == 2 * 16


def test_groups_and_ungrouped_channels():
    additive = [0.5, -1.0, 2.0, 0.25]
    model = GameModel(additive, [((0, 2), 1.0)])
    x = torch.ones(1, 4, 3, 3, 3, dtype=torch.float64)
    # two players {0,1} and {2,3}: v = 0.5 - 1 + 2 + 0.25 + unanimity needing both players
    res = channel_shapley(model, x, game_value, groups={"A": [0, 1], "B": (2, 3)})
    assert res.players == ["A", "B"] and res.groups == [(0, 1), (2, 3)]
    torch.testing.assert_close(res.values[0], torch.tensor([-0.5 + 0.5, 2.25 + 0.5], dtype=torch.float64))
    assert res.n_evaluations == 4 and res.n_coalitions == 4
    # channel 3 in no group: always present, so it enters v(empty) and no value
    res = channel_shapley(model, x, game_value, groups=[0, 1, 2], players=["a", "b", "c"])
    torch.testing.assert_close(res.values[0], torch.tensor([1.0, -1.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(res.value_of([]), torch.tensor([0.25], dtype=torch.float64))
    torch.testing.assert_close(res.value_of(["a", "c"]), torch.tensor([0.5 + 2.0 + 1.0 + 0.25], dtype=torch.float64))
    with pytest.raises(InputError, match="overlap"):
        channel_shapley(model, x, game_value, groups=[[0, 1], [1, 2]])
    with pytest.raises(InputError, match="4 channels"):
        channel_shapley(model, x, game_value, groups=[[0, 4]])


def test_baselines():
    torch.manual_seed(3)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = GameModel(a)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.5
    mean = x.flatten(2).mean(2)
    # a linear game: phi_c = a_c (mean(x_c) - mean(baseline_c))
    const = torch.tensor([0.2, 0.7, -0.1], dtype=torch.float64)
    res = channel_shapley(model, x, game_value, baseline=const.tolist())
    torch.testing.assert_close(res.values, a * (mean - const))
    res = channel_shapley(model, x, game_value, baseline=0.3)
    torch.testing.assert_close(res.values, a * (mean - 0.3))
    res = channel_shapley(model, x, game_value)                      # "zero"
    torch.testing.assert_close(res.values, a * mean)
    res = channel_shapley(model, x, game_value, baseline="mean")     # mean fill: a linear model sees no change
    torch.testing.assert_close(res.values, torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    img = torch.rand(3, 4, 4, dtype=torch.float64)                   # a (C, *spatial) tensor baseline
    res = channel_shapley(model, x, game_value, baseline=img)
    torch.testing.assert_close(res.values, a * (mean - img.flatten(1).mean(1)))
    with pytest.raises(InputError, match="broadcast"):
        channel_shapley(model, x, game_value, baseline=torch.zeros(5, 4, 4))
    with pytest.raises(InputError, match="one value per channel"):
        channel_shapley(model, x, game_value, baseline=[0.0, 1.0])
    with pytest.raises(InputError):
        channel_shapley(model, x, game_value, baseline="median")


def test_permutation_sampling_converges_to_exact():
    model = small_unet(c_in=5)
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4, 4, 4, dtype=torch.float64)
    vf = mean_foreground_probability(1)
    exact = channel_shapley(model, x, vf, method="exact")
    errs = []
    for m in (20, 400):
        s = channel_shapley(model, x, vf, method="permutation", n_permutations=m, seed=0)
        assert s.stderr is not None and s.n_permutations == m
        assert s.efficiency_gap().abs().max() < 1e-12            # every permutation telescopes
        assert s.n_coalitions <= 2 ** 5 and s.n_evaluations == 2 * s.n_coalitions
        errs.append((s.values - exact.values).abs().max().item())
    assert ((s.values - exact.values).abs() <= 5 * s.stderr + 1e-9).all()
    assert errs[1] < errs[0]
    torch.manual_seed(12345)                                    # the global RNG plays no part: orders come from seed
    again = channel_shapley(model, x, vf, method="permutation", n_permutations=400, seed=0)
    torch.testing.assert_close(again.values, s.values, rtol=0, atol=0)
    other = channel_shapley(model, x, vf, method="permutation", n_permutations=400, seed=1)
    assert (other.values - s.values).abs().max() > 1e-9          # another seed, other orders
    plain = channel_shapley(model, x, vf, method="permutation", n_permutations=400, antithetic=False, seed=1)
    assert ((plain.values - exact.values).abs() <= 5 * plain.stderr + 1e-9).all()


def test_many_players_use_sampling_with_known_game():
    n = 12
    additive = torch.linspace(-1, 1, n).tolist()
    unanimity = [((0, 5), 1.2), ((2, 3, 4), -0.9)]
    model = GameModel(additive, unanimity)
    x = torch.ones(1, n, 2, 2, 2, dtype=torch.float64)
    res = channel_shapley(model, x, game_value, n_permutations=600, seed=0)   # auto -> permutation
    assert res.method == "permutation"
    expect = textbook(additive, unanimity, n)
    assert (res.values[0] - expect).abs().max() < 0.05
    assert ((res.values[0] - expect).abs() <= 5 * res.stderr[0] + 1e-9).all()
    with pytest.raises(InputError, match="permutation"):
        channel_shapley(model, x, game_value, method="exact", max_exact=10)


def test_cost_chunking_and_batch_consistency():
    model = small_unet()
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5, 5, 5, dtype=torch.float64)
    ref = torch.randint(0, 2, (3, 5, 5, 5))
    vf = dice(1, ref, soft=True)
    full = channel_shapley(model, x, vf, chunk_size=None)
    assert full.n_evaluations == 3 * 16 and full.n_coalitions == 16 and full.method == "exact"
    one = channel_shapley(model, x, vf, chunk_size=1)
    torch.testing.assert_close(one.values, full.values, rtol=0, atol=1e-12)
    odd = channel_shapley(model, x, vf, chunk_size=7)
    torch.testing.assert_close(odd.values, full.values, rtol=0, atol=1e-12)
    for b in range(3):  # a sample's values do not depend on the rest of the batch; refs follow rows
        single = channel_shapley(model, x[b:b + 1], dice(1, ref[b:b + 1], soft=True))
        torch.testing.assert_close(single.values[0], full.values[b], rtol=0, atol=1e-12)
    codes, table = full.table()
    assert codes.tolist() == list(range(16)) and table.shape == (3, 16)
    torch.testing.assert_close(table @ shapley_weights(4), full.values)


def test_dice_value_function_brats_regions():
    # a "model" that outputs one-hot logits of a fixed label map (labels {0,1,2,4} on channels 0..3)
    lab = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    lab[0, 1:3, 1:3, 1:3] = 1
    lab[0, 3:5, 3:5, 3:5] = 2
    lab[0, 0, 0, :2] = 4
    chan = torch.tensor([0, 1, 2, 3, 3])[lab]                          # label -> channel (4 -> 3)
    logits = torch.nn.functional.one_hot(chan, 4).movedim(-1, 1).double() * 5
    ref = lab.clone()
    ref[0, 1, 1, 1] = 0                                                # one NCR voxel missed by the ref
    rows = torch.zeros(1, dtype=torch.long)
    cl = (0, 1, 2, 4)
    wt = dice("WT", ref, class_labels=cl)(logits, rows)
    p, g = 8 + 8 + 2, 8 + 8 + 2 - 1
    torch.testing.assert_close(wt, torch.tensor([2 * g / (p + g)], dtype=torch.float64))
    torch.testing.assert_close(dice("ET", ref, class_labels=cl)(logits, rows), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(dice("tc", ref, class_labels=cl)(logits, rows),
                               torch.tensor([2 * 9 / (10 + 9)], dtype=torch.float64))
    torch.testing.assert_close(dice(2, ref, class_labels=cl)(logits, rows), torch.ones(1, dtype=torch.float64))
    # both empty -> 1 (BraTS convention), or the value asked for
    empty_ref = torch.zeros_like(ref)
    no_et = logits.clone()
    no_et[:, 3] = -5
    torch.testing.assert_close(dice("ET", empty_ref, class_labels=cl)(no_et, rows), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(dice("ET", empty_ref, class_labels=cl, empty=0.0)(no_et, rows),
                               torch.zeros(1, dtype=torch.float64))
    # a sigmoid (region-based) head: channel 0 predicts WT
    region_logits = torch.where(lab > 0, 4.0, -4.0).double()[:, None]
    torch.testing.assert_close(dice("WT", ref, activation="sigmoid", channel=0)(region_logits, rows),
                               torch.tensor([2 * g / (p + g)], dtype=torch.float64))
    with pytest.raises(TargetError, match="unknown region"):
        dice("XX", ref)
    with pytest.raises(TargetError, match="class_labels"):
        dice("ET", ref)(logits, rows)                                  # channel 3 would be label 3
    with pytest.raises(TargetError, match="spatial shape"):
        dice(1, ref[:, :4])(logits, rows)
    with pytest.raises(TargetError, match="channel="):
        dice(1, ref, activation="sigmoid")


def test_mean_foreground_probability_and_targets_as_value():
    torch.manual_seed(6)
    out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rows = torch.tensor([1, 0])
    p = torch.softmax(out, 1)[:, 2]
    torch.testing.assert_close(mean_foreground_probability(2)(out, rows), p.flatten(1).mean(1))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, 3, 3] = True
    got = mean_foreground_probability(0, "sigmoid", mask=mask)(out, rows)    # row 0 uses mask[1]
    torch.testing.assert_close(got, torch.stack([torch.sigmoid(out[0, 0, 3, 3]), torch.sigmoid(out[1, 0, :2]).mean()]))
    # a Region target (sum of logits in a region) is a value function too
    model = small_unet(dims=2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    tgt = mx.targets.Region(1, mask)
    res = channel_shapley(model, x, tgt)
    with torch.no_grad():
        assert torch.allclose(res.value_of([0, 1, 2, 3]), tgt.scores(model(x)).double())


def test_model_left_as_found_and_errors():
    model = small_unet()
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    channel_shapley(model, x, mean_foreground_probability(1))

    def bad(out):
        return out.flatten(1).sum(1)[:1]

    with pytest.raises(TargetError, match="shape"):
        channel_shapley(model, x, bad)
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TargetError, match="NaN"):
        channel_shapley(model, x, lambda out: out.flatten(1).sum(1) * float("nan"))
    with pytest.raises(InputError, match="channel mismatch"):
        channel_shapley(model, torch.randn(1, 3, 4, 4, 4, dtype=torch.float64), mean_foreground_probability(1))
    with pytest.raises(InputError, match="NaN"):
        channel_shapley(model, x * float("nan"), mean_foreground_probability(1))
    with pytest.raises(OptionError, match="estimator must be one of"):   # the registered method's choices
        channel_shapley(model, x, mean_foreground_probability(1), method="kernel")
    with pytest.raises(TargetError, match="out of range"):
        channel_shapley(model, x, mean_foreground_probability(5))
    with pytest.raises(UnsupportedModelError):
        channel_shapley(lambda t: t, x, mean_foreground_probability(1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_scripted_model_and_ranks():
    model = GameModel([0.1, 3.0, -1.0, 1.0])
    x = torch.ones(1, 4, 2, 2, 2, dtype=torch.float64)
    res = channel_shapley(model, x, game_value, players=["T1", "T1c", "T2", "FLAIR"])
    assert res.ranking[0].tolist() == [1, 3, 0, 2]
    assert res.ranks[0].tolist() == [3, 1, 4, 2]
    assert res.info["seconds"] > 0 and res.info["n_forward"] == 16 and res.n_evaluations == 16
    scripted = torch.jit.script(small_unet())
    y = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    eager = channel_shapley(small_unet(), y, mean_foreground_probability(1))
    torch.testing.assert_close(channel_shapley(scripted, y, mean_foreground_probability(1)).values, eager.values)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_shapley_folds_agreement_uncertainty(tmp_path):
    import csv
    import json

    nib = pytest.importorskip("nibabel")
    import numpy as np
    from typer.testing import CliRunner

    from medexplain.cli import app

    torch.manual_seed(7)
    img = torch.randn(4, 5, 5, 5)
    nib.save(nib.Nifti1Image(img.movedim(0, -1).numpy(), np.eye(4)), str(tmp_path / "case.nii.gz"))
    for c, name in enumerate(["t1", "t1c", "t2", "flair"]):
        nib.save(nib.Nifti1Image(img[c].numpy(), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    seg = (img[3] > 0.5).long()
    nib.save(nib.Nifti1Image(seg.numpy().astype(np.int16), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    models = [small_unet(seed=s).float() for s in (0, 1)]
    for s, m in enumerate(models):
        torch.jit.save(torch.jit.script(m), str(tmp_path / f"fold{s}.pt"))
    args = ["shapley", str(tmp_path / "case.nii.gz"), "--model", str(tmp_path / "fold0.pt"),
            "--model", str(tmp_path / "fold1.pt"), "--contrasts", "T1,T1c,T2,FLAIR",
            "--reference-ranking", "WT", "--value", "dice:1", "--seg", str(tmp_path / "seg.nii.gz"),
            "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "values.csv")))
    assert len(rows) == 8 and {r["contrast"] for r in rows} == {"T1", "T1c", "T2", "FLAIR"}
    direct = channel_shapley(models[1], img[None], dice(1, seg[None]))
    got = torch.tensor([float(r["shapley_value"]) for r in rows if r["model"] == "1"], dtype=torch.float64)
    torch.testing.assert_close(got, direct.values[0], rtol=0, atol=1e-9)
    assert len(list(csv.DictReader(open(out / "coalitions.csv")))) == 32
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["per_model"][1] == [["T1", "T1c", "T2", "FLAIR"][j] for j in direct.ranking[0].tolist()]
    agreement = json.loads((out / "agreement.json").read_text())
    assert agreement["reference"] == ["FLAIR", "T2", "T1c", "T1"] and len(agreement["per_model"]) == 2
    unc = json.loads((out / "uncertainty.json").read_text())
    assert set(unc["per_contrast"]) == {"T1", "T1c", "T2", "FLAIR"}
    from medexplain.metrics.ranking import rank_uncertainty
    direct0 = channel_shapley(models[0], img[None], dice(1, seg[None]))
    per_contrast = rank_uncertainty([direct0, direct], per_player=True)[0]   # the two folds' rank variance
    assert unc["rank_variance"] == pytest.approx(float(per_contrast.mean()))
    assert [unc["per_contrast"][p] for p in ["T1", "T1c", "T2", "FLAIR"]] == pytest.approx(per_contrast.tolist())

    # one file per contrast gives the same values; a wrong contrast count is a clean error (exit 2)
    per_file = [str(tmp_path / f"{n}.nii.gz") for n in ["t1", "t1c", "t2", "flair"]]
    res = CliRunner().invoke(app, ["shapley", *per_file, "--model", str(tmp_path / "fold1.pt"), "--value",
                                   "dice:1", "--seg", str(tmp_path / "seg.nii.gz"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    rows2 = list(csv.DictReader(open(tmp_path / "o2" / "values.csv")))
    torch.testing.assert_close(torch.tensor([float(r["shapley_value"]) for r in rows2], dtype=torch.float64),
                               direct.values[0], rtol=0, atol=1e-9)
    assert not (tmp_path / "o2" / "uncertainty.json").exists()
    res = CliRunner().invoke(app, ["shapley", str(tmp_path / "case.nii.gz"), "--model", str(tmp_path / "fold0.pt"),
                                   "--contrasts", "T1,T2", "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "4 channels" in res.output


def test_contrast_shapley_is_a_registered_channel_attribution_with_a_target_as_value():
    """``mx.explain(model, x, "contrast_shapley", target=<value target>)`` is what ``channel_shapley`` returns:
    values, coalition table, evaluation count; the map holds each player's value on its channels, its
    cost model equals the counted rows, and a hard value target is refused by a gradient method."""
    from medexplain.engine.options import estimate_passes
    from medexplain.engine.registry import get_method
    from medexplain.segmentation.shapley import volume

    model = small_unet(dims=2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).argmax(1)
    for value in (dice(1, ref), volume(1), volume(1, soft=True), mean_foreground_probability(1)):
        groups = {"a": (0, 1), "b": 2}                                   # channel 3: always present
        attr = mx.explain(model, x, "contrast_shapley", target=value, groups=groups)
        res = channel_shapley(model, x, value, groups=groups)
        torch.testing.assert_close(torch.tensor(attr.info["values"], dtype=torch.float64), res.values, rtol=0, atol=0)
        assert attr.info["n_evaluations"] == res.n_evaluations == 2 * 4 and res.players == ["a", "b"]
        for c, player in ((0, 0), (1, 0), (2, 1)):
            assert torch.all(attr.map[:, c] == res.values[:, player, None, None].to(attr.map.dtype))
        assert torch.all(attr.map[:, 3] == 0)
        spec = get_method("contrast_shapley")
        assert estimate_passes(spec.name, spec.fn, x.shape, {"groups": groups}) == (attr.info["n_forward"], 0)
    # volume: the predicted voxel count of label 1 (hard) or the summed probability (soft), independently
    out = model(x).detach()
    rows = torch.arange(2)
    assert torch.equal(volume(1)(out, rows), (out.argmax(1) == 1).flatten(1).sum(1).double())
    torch.testing.assert_close(volume(1, soft=True)(out, rows), torch.softmax(out, 1)[:, 1].flatten(1).sum(1))
    with pytest.raises(TargetError, match="hard prediction"):
        mx.explain(model, x, "saliency", target=volume(1))
    soft = mx.explain(model, x, "saliency", target=volume(1, soft=True)).map
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.softmax(model(xr), 1)[:, 1].sum(), xr)
    torch.testing.assert_close(soft, g)


def test_value_targets_without_activation_read_the_models_own():
    """``activation=None`` (the value functions' default) is the model object's activation, bound by
    ``mx.explain`` itself: ``mx.explain(mx.Model(net, activation="sigmoid"), ..., target=v)`` equals the
    same call with ``activation="sigmoid"`` spelled in the value target, and the bare module reads ``auto``
    (softmax over several logit channels)."""
    from medexplain.segmentation.shapley import bind_model, volume

    net = small_unet(dims=2)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sig = mx.Model(net, activation="sigmoid")
    for unbound, spelled in ((mean_foreground_probability(1), mean_foreground_probability(1, "sigmoid")),
                             (volume(1, channel=1, soft=True), volume(1, activation="sigmoid", channel=1, soft=True))):
        by_model = mx.explain(sig, x, "contrast_shapley", target=unbound).info["values"]
        given = mx.explain(net, x, "contrast_shapley", target=spelled).info["values"]
        assert by_model == given
        assert by_model != mx.explain(net, x, "contrast_shapley", target=unbound).info["values"]
        assert unbound.name == spelled.name
    out = net(x).detach()
    v = mean_foreground_probability(1)
    torch.testing.assert_close(bind_model(v, sig)(out, torch.arange(1)), torch.sigmoid(out)[:, 1].flatten(1).mean(1))
    torch.testing.assert_close(v(out, torch.arange(1)), torch.softmax(out, 1)[:, 1].flatten(1).mean(1))
