"""Ranking metrics of contrast-level Shapley values (medexplain.metrics.ranking)."""
import math

import numpy as np
import pytest
import torch

import medexplain as mx
from medexplain.errors import InputError
from medexplain.metrics import ranking as R


def test_exported_from_metrics_package():
    for name in ("rank_agreement", "rank_uncertainty", "pearson_with_dice", "agreement_by_dice"):
        assert getattr(mx.metrics, name) is getattr(R, name)


def test_rank_agreement_textbook_values():
    players = ["T1", "T1c", "T2", "FLAIR"]
    # values ordered exactly as the ET reference T1c > FLAIR > T2 > T1
    same = torch.tensor([[0.1, 0.9, 0.3, 0.5]])
    out = R.rank_agreement(same, "ET", players=players)
    assert out["kendall_tau"].item() == pytest.approx(1.0)
    assert out["spearman_rho"].item() == pytest.approx(1.0)
    assert out["top1"].item() == 1.0
    # one adjacent swap among 4: 5 concordant, 1 discordant pair -> tau 4/6; rho = 1 - 6*2/(4*15) = 0.8
    swap = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    out = R.rank_agreement(swap, ["T1c", "FLAIR", "T2", "T1"], players=players)
    assert out["kendall_tau"].item() == pytest.approx(4 / 6) and out["somers_d"].item() == pytest.approx(4 / 6)
    assert out["spearman_rho"].item() == pytest.approx(0.8)
    assert out["top1"].item() == 0.0
    # reversed, by indices, several samples at once, and aliases of BraTS file names
    rev = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.1, 0.9, 0.3, 0.5]])
    out = R.rank_agreement(rev, ["t1ce", "t2f", "t2w", "t1n"], players=players)
    assert out["kendall_tau"].tolist() == pytest.approx([-1.0, 1.0])
    assert out["spearman_rho"].tolist() == pytest.approx([-1.0, 1.0])
    assert out["top1"].tolist() == [0.0, 1.0]
    per_sample = torch.tensor([[1, 3, 2, 0], [0, 2, 3, 1]])
    out = R.rank_agreement(rev, per_sample)
    assert out["kendall_tau"][1].item() == pytest.approx(-1.0)


def test_rank_agreement_ties_and_constant_values():
    v = torch.tensor([[0.0, 0.1, 0.5, 1.0], [0.1, 0.0, 0.5, 1.0], [0.1, 0.0, 1.0, 0.5]])
    # planted set: true ranking [3, 2, 1, 0] with 0 and 1 tied: both orders of 0/1 agree perfectly
    out = R.rank_agreement(v, [3, 2, 1, 0], tied_groups=[[0, 1]])
    assert out["kendall_tau"][0].item() == pytest.approx(out["kendall_tau"][1].item())
    assert out["kendall_tau"][0].item() == pytest.approx(5 / math.sqrt(30))   # tau-b: 6 pairs, 1 tied in the ref
    assert out["somers_d"][:2].tolist() == pytest.approx([1.0, 1.0])
    assert out["somers_d"][2].item() == pytest.approx(3 / 5)                 # 4 concordant, 1 discordant of 5
    untied = R.rank_agreement(v, [3, 2, 1, 0])
    assert untied["kendall_tau"][1].item() == pytest.approx(4 / 6)
    assert untied["somers_d"][1].item() == pytest.approx(4 / 6)
    assert out["top1"].tolist() == [1.0, 1.0, 0.0]
    # a tie at the top: either tied player is a top-1 match
    top_tie = R.rank_agreement(torch.tensor([[0.0, 0.1, 1.0, 0.9]]), [3, 2, 1, 0], tied_groups=[[3, 2]])
    assert top_tie["top1"].item() == 1.0
    flat = R.rank_agreement(torch.zeros(1, 4), [0, 1, 2, 3])
    assert all(math.isnan(flat[k].item()) for k in ("kendall_tau", "spearman_rho", "somers_d"))


def test_rank_agreement_accepts_shapley_result():
    from medexplain.segmentation.shapley import channel_shapley
    model = torch.nn.Conv3d(4, 2, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, :, 0, 0, 0] = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    x = torch.ones(1, 4, 2, 2, 2, dtype=torch.float64)
    res = channel_shapley(model, x, lambda out: out[:, 1].flatten(1).mean(1), players=["T1", "T1c", "T2", "FLAIR"])
    out = R.rank_agreement(res, "ET")                    # T1c > FLAIR > T2 > T1: exactly the weights' order
    assert out["kendall_tau"].item() == pytest.approx(1.0) and out["top1"].item() == 1.0


def test_rank_agreement_errors():
    v = torch.rand(2, 4)
    with pytest.raises(InputError, match="exactly once"):
        R.rank_agreement(v, [0, 1, 1, 2])
    with pytest.raises(InputError, match="players"):
        R.rank_agreement(v, ["T1", "T2", "T1c", "FLAIR"])
    with pytest.raises(InputError, match="not players"):
        R.rank_agreement(v, ["T1", "T2", "T1c", "PD"], players=["T1", "T1c", "T2", "FLAIR"])
    with pytest.raises(InputError, match="2 players"):
        R.rank_agreement(torch.rand(2, 1), [0])


def test_rank_uncertainty():
    fold_a = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    same = R.rank_uncertainty([fold_a, fold_a, fold_a])
    assert same.tolist() == [0.0, 0.0]
    # fold b swaps the top two of case 0: ranks of players 0, 1 are {1, 2} -> variance 1/4 each
    fold_b = fold_a.clone()
    fold_b[0, :2] = torch.tensor([3.0, 4.0])
    u = R.rank_uncertainty(torch.stack([fold_a, fold_b]))
    assert u.tolist() == pytest.approx([0.125, 0.0])
    assert R.rank_uncertainty([fold_a, fold_b], ddof=1).tolist() == pytest.approx([0.25, 0.0])
    per = R.rank_uncertainty([fold_a, fold_b], per_player=True)
    assert per.shape == (2, 4) and per[0].tolist() == pytest.approx([0.25, 0.25, 0, 0])
    single_case = R.rank_uncertainty(torch.stack([fold_a[0], fold_b[0]]))   # (F, n) for one case
    assert single_case.tolist() == pytest.approx([0.125])
    # matches the definition on random values: ranks per fold, variance over folds, mean over players
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(5, 7, 4))
    ranks = np.argsort(np.argsort(-vals, -1), -1) + 1
    np.testing.assert_allclose(R.rank_uncertainty(vals).numpy(), ranks.var(0).mean(-1))
    with pytest.raises(InputError):
        R.rank_uncertainty([fold_a])


def test_paper_tests_against_dice():
    rng = np.random.default_rng(1)
    dice = rng.uniform(0, 1, 60)
    variance = 1.5 - dice + rng.normal(0, 0.1, 60)     # more rank variance where Dice is low
    res = R.pearson_with_dice(variance, dice)
    assert res["n"] == 60 and res["r"] == pytest.approx(np.corrcoef(variance, dice)[0, 1]) and res["r"] < -0.8
    assert res["p"] < 1e-6
    with_nan = R.pearson_with_dice(np.r_[variance, np.nan], np.r_[dice, 0.5])
    assert with_nan["n"] == 60 and with_nan["r"] == pytest.approx(res["r"])
    agreement = np.where(dice > 0.6, 0.9, 0.2) + rng.normal(0, 0.05, 60)
    g = R.agreement_by_dice(agreement, dice, alternative="greater")
    assert g["n_high"] == int((dice > 0.6).sum()) and g["n_low"] == int((dice <= 0.6).sum())
    assert g["mean_high"] > g["mean_low"] and g["p"] < 1e-6
    assert g["u"] == pytest.approx(g["n_high"] * g["n_low"])  # complete separation: U = n1 * n2
    none_high = R.agreement_by_dice(agreement, np.zeros(60))
    assert none_high["n_high"] == 0 and math.isnan(none_high["p"])
    # a boundary case goes to the low group (Dice <= 0.6)
    b = R.agreement_by_dice([1.0, 0.0], [0.6, 0.61])
    assert b["mean_low"] == 1.0 and b["mean_high"] == 0.0
    with pytest.raises(InputError):
        R.pearson_with_dice([1, 2, 3], [1, 2])
