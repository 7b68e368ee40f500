"""Contrast-level Shapley values (issue 8): speed against Captum, and the paper's analysis
(Ren et al. 2025, arXiv:2512.07224) in kind on the planted 4-contrast set with a known true ranking.

    .venv/bin/python bench/shapley.py [--quick]

Part 1, speed. A small MONAI 3D U-Net (4 -> 2 channels, channels 8-16-32, one residual unit), one case,
value = mean foreground probability. Ours: exact values over the 16 coalitions, batched. Reference
units: 16 forward passes of batch 1 (goal: ours within 1.5x) and Captum's ShapleyValues with a per-channel
feature mask (goal: ours >= 100x faster at identical values), run in full on 4 x 16^3 and 4 x 48^3 with
the values compared. Captum's cost grows with the volume beyond its 97 single-case forward passes: it
loops in Python over every element of the feature mask for each of its 24 permutations. Our times and
the 16 forward passes are the best of 3 runs; Captum runs once per size (minutes). The machine is a shared
2-core one: other processes' load makes absolute times vary between runs.

Part 2, the paper's analysis in kind. ``medexplain.data.contrast_volumes``: channels T1-, T1c-, T2- and
FLAIR-like, lesions planted with visibility 0, 0, 0.35, 1, so the true ranking is FLAIR > T2 > {T1, T1c}
(T1 and T1c tied). k = 5 fold models (the 3D U-Net above, trained on 4/5 of a training pool each; tiny
and few epochs so the bench fits ~10 minutes on 2 cores), exact Shapley values of the Dice of the lesion
label on held-out test cases (absent contrasts = 0 on per-case z-scored input, i.e. mean fill). Reported:
agreement of each model's ranking with the true one (Somers' D, which is 1 for a perfect match of the tied
ranking; Kendall tau-b; top-1), agreement in Dice > 0.6 vs <= 0.6 cases (Mann-Whitney U, one-sided), and
the Pearson correlation between the per-case rank variance across the 5 models and the mean Dice.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, machine, markdown_table, write_result  # noqa: E402
from medexplain.metrics import agreement_by_dice, pearson_with_dice, rank_agreement, rank_uncertainty  # noqa: E402
from medexplain.segmentation.shapley import channel_shapley, dice, mean_foreground_probability  # noqa: E402

warnings.filterwarnings("ignore")
NAMES = ["T1", "T1c", "T2", "FLAIR"]


def unet(seed: int):
    from medexplain.models import zoo
    torch.manual_seed(seed)
    return zoo.unet_3d(4, 2)  # MONAI UNet 8-16-32, strides 2, one residual unit


# --------------------------------------------------------------------------------------------------
# part 1: speed
# --------------------------------------------------------------------------------------------------

def captum_time(net, x, vf):
    """Captum ShapleyValues (channel feature mask, zero baseline), one full run: (seconds, forward rows,
    attributions (B, 4))."""
    from captum.attr import ShapleyValues
    calls = [0]

    def forward_func(inp):
        calls[0] += inp.shape[0]
        with torch.no_grad():
            return vf(net(inp), torch.zeros(inp.shape[0], dtype=torch.long))

    mask = torch.arange(4).view(1, 4, 1, 1, 1).expand_as(x).contiguous()
    t0 = time.perf_counter()
    attr = ShapleyValues(forward_func).attribute(x, baselines=0.0, feature_mask=mask)
    return time.perf_counter() - t0, calls[0], attr[:, :, 0, 0, 0]


def speed(sizes, repeat=3):
    net = unet(0).eval()
    vf = mean_foreground_probability(1)
    rows = []
    for s in sizes:
        torch.manual_seed(1)
        x = torch.randn(1, 4, s, s, s)
        with torch.no_grad():
            net(x)
            t16 = best_time(lambda x=x: [net(x) for _ in range(16)], repeat)
        res = channel_shapley(net, x, vf)
        t_ours = best_time(lambda x=x: channel_shapley(net, x, vf), repeat)
        t_cap, calls, attr = captum_time(net, x, vf)
        diff = (res.values[0].float() - attr[0]).abs().max().item()
        rows.append([f"4 x {s}^3", t_ours, res.n_evaluations, t16, t_ours / t16, t_cap, calls, t_cap / t_ours,
                     t_cap / (t16 / 16), diff])
    header = ["volume", "ours (s)", "ours evals", "16 fwd (s)", "ours / 16 fwd (goal <= 1.5)", "Captum (s)",
              "Captum evals", "Captum / ours (goal >= 100)", "Captum in forward passes", "max abs diff ours vs Captum"]
    return markdown_table(header, rows)


# --------------------------------------------------------------------------------------------------
# part 2: the planted 4-contrast set with k fold models
# --------------------------------------------------------------------------------------------------

def zscore(x):
    return (x - x.mean(dim=(2, 3, 4), keepdim=True)) / x.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)


def train_fold(x, seg, seed, epochs, batch=2, lr=3e-3):
    """Plain Adam on DiceCE. (medexplain.models.training.train's one-cycle schedule with warm-up reached Dice
    ~0.01 in these 5 epochs, too little to study agreement vs Dice within the time budget.)"""
    from monai.losses import DiceCELoss
    net = unet(seed)
    opt = torch.optim.Adam(net.parameters(), lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = loss_fn(net(x[idx]), seg[idx][:, None])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def hard_dice(net, x, seg):
    with torch.no_grad():
        return dice(1, seg)(net(x), torch.arange(len(x)))


def planted(n_pool, n_test, size, folds, epochs):
    from medexplain import data
    ds = data.contrast_volumes(n=n_pool + n_test, size=size, seed=0)
    truth, ties = ds.meta_info["true_ranking"], ds.meta_info["ranking_ties"]
    x, seg = zscore(ds.images), ds.seg
    x_pool, s_pool, x_test, s_test = x[:n_pool], seg[:n_pool], x[n_pool:], seg[n_pool:]
    parts = np.array_split(np.arange(n_pool), folds)
    values, dices, t_train, t_shap, evals = [], [], 0.0, 0.0, 0
    for f in range(folds):
        keep = np.setdiff1d(np.arange(n_pool), parts[f])
        t0 = time.perf_counter()
        net = train_fold(x_pool[keep], s_pool[keep], seed=f, epochs=epochs)
        t_train += time.perf_counter() - t0
        t0 = time.perf_counter()
        res = channel_shapley(net, x_test, dice(1, s_test), players=NAMES, chunk_size=16)
        t_shap += time.perf_counter() - t0
        evals += res.n_evaluations
        values.append(res.values)
        dices.append(hard_dice(net, x_test, s_test).numpy())
    v = torch.stack(values)                        # (F, cases, 4)
    d = np.stack(dices)                            # (F, cases)
    agr = rank_agreement(v.reshape(-1, 4), truth, tied_groups=ties)      # one row per (model, case)
    somers, tau, top1 = (agr[k].numpy() for k in ("somers_d", "kendall_tau", "top1"))
    by_dice_d = agreement_by_dice(somers, d.ravel(), alternative="greater")
    by_dice_t = agreement_by_dice(tau, d.ravel(), alternative="greater")
    by_dice_top = agreement_by_dice(top1, d.ravel(), alternative="greater")
    var = rank_uncertainty(v).numpy()              # (cases,)
    corr = pearson_with_dice(var, d.mean(0))
    mean_v = v.mean((0, 1))
    consensus = [NAMES[i] for i in torch.argsort(-mean_v, stable=True).tolist()]
    hi = d.ravel() > 0.6

    lines = [f"Planted set: contrast_volumes(n={n_pool + n_test}, size={size}, seed=0), true ranking "
             f"{' > '.join(NAMES[i] for i in truth)} with ties {[[NAMES[i] for i in g] for g in ties]}; "
             f"{folds} fold models (3D U-Net 8-16-32, {epochs} epochs on {n_pool - len(parts[0])}-"
             f"{n_pool - len(parts[-1])} of {n_pool} training cases each), {n_test} held-out test cases; value = "
             f"Dice of the lesion label; baseline 0 on per-case z-scored input.",
             f"Training {t_train:.0f} s; Shapley {t_shap:.1f} s for {evals} model evaluations "
             f"({folds} models x {n_test} cases x 16 coalitions).", ""]
    rows = [["Dice per (model, case): mean [min, max]", f"{d.mean():.3f} [{d.min():.3f}, {d.max():.3f}]"],
            ["(model, case) pairs with Dice > 0.6 / <= 0.6", f"{hi.sum()} / {(~hi).sum()}"],
            ["mean Shapley value per contrast (Dice points)",
             ", ".join(f"{n} {float(mean_v[i]):+.3f}" for i, n in enumerate(NAMES))],
            ["consensus ranking (mean value)", " > ".join(consensus)],
            ["agreement with the true ranking: Somers' D mean", f"{np.nanmean(somers):.3f}"],
            ["agreement: Kendall tau-b mean (max 0.913 with the tie)", f"{np.nanmean(tau):.3f}"],
            ["agreement: top-1 match rate (FLAIR first)", f"{np.nanmean(top1):.3f}"],
            ["Somers' D, Dice > 0.6 vs <= 0.6 (mean; MWU one-sided p)",
             f"{by_dice_d['mean_high']:.3f} vs {by_dice_d['mean_low']:.3f}; U={by_dice_d['u']:.1f}, p={by_dice_d['p']:.3g}"],
            ["tau-b, Dice > 0.6 vs <= 0.6 (mean; MWU one-sided p)",
             f"{by_dice_t['mean_high']:.3f} vs {by_dice_t['mean_low']:.3f}; U={by_dice_t['u']:.1f}, p={by_dice_t['p']:.3g}"],
            ["top-1, Dice > 0.6 vs <= 0.6 (mean; MWU one-sided p)",
             f"{by_dice_top['mean_high']:.3f} vs {by_dice_top['mean_low']:.3f}; U={by_dice_top['u']:.1f}, p={by_dice_top['p']:.3g}"],
            ["rank variance across folds per case: mean [min, max]", f"{var.mean():.3f} [{var.min():.3f}, {var.max():.3f}]"],
            ["Pearson r(rank variance, mean Dice) (paper, U-Net: -0.581)",
             f"r={corr['r']:.3f}, p={corr['p']:.3g}, n={corr['n']}"]]
    return "\n".join(lines) + "\n" + markdown_table(["measure", "result"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller everything (a smoke run, not the reported figures)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--n-pool", type=int, default=25)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--speed-only", action="store_true", help="part 1 only, written to results/shapley_speed.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.folds, a.epochs, a.size, a.n_pool, a.n_test = 2, 1, 16, 6, 4
    t0 = time.perf_counter()
    sizes = (16, 24) if a.quick else (16, 48)
    part1 = speed(sizes, repeat=1 if a.quick else 3)
    if a.speed_only:
        write_result("shapley_speed", f"# Contrast-level Shapley values, speed only (bench/shapley.py {' '.join(sys.argv[1:])})"
                     f"\n\nMachine: {machine()}. Total bench time {time.perf_counter() - t0:.0f} s.\n\n{part1}\n")
        return
    part2 = planted(a.n_pool, a.n_test, a.size, a.folds, a.epochs)
    text = (f"# Contrast-level Shapley values (bench/shapley.py {' '.join(sys.argv[1:])})\n\n"
            f"Machine: {machine()}. Total bench time {time.perf_counter() - t0:.0f} s.\n\n"
            f"## Speed: exact values for 4 contrasts, one case, MONAI 3D U-Net\n\n{part1}\n\n"
            f"## Agreement and uncertainty on the planted 4-contrast set\n\n{part2}\n")
    write_result("shapley_quick" if a.quick else "shapley", text)


if __name__ == "__main__":
    main()
