"""Ranking metrics of contrast-level Shapley values (Ren et al. 2025, arXiv:2512.07224).

From the Shapley values of the contrasts the paper derives two case-level measures:

- **agreement** between the model's contrast ranking (order of the values) and a clinician's ranking:
  Kendall's tau-b, Spearman's rho and whether the top contrast matches (:func:`rank_agreement`);
- **uncertainty**: the variance of each contrast's rank across the cross-validation fold models,
  averaged over the contrasts (:func:`rank_uncertainty`);

and tests them against segmentation quality: agreement in cases with Dice > 0.6 vs <= 0.6 (Mann-Whitney
U, :func:`agreement_by_dice`) and the Pearson correlation of rank variance with Dice
(:func:`pearson_with_dice`; the paper reports r = -0.581 for its U-Net).
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch
from scipy import stats

from medexplain.errors import InputError

__all__ = ["CLINICIAN_RANKINGS", "rank_agreement", "rank_uncertainty", "pearson_with_dice", "agreement_by_dice",
           "ranks_from_values", "resolve_ranking"]

#: Proposed clinician rankings per BraTS region, most important first.
CLINICIAN_RANKINGS: dict[str, tuple[str, ...]] = {
    "ET": ("T1c", "FLAIR", "T2", "T1"),
    "WT": ("FLAIR", "T2", "T1c", "T1"),
    "ED": ("FLAIR", "T2", "T1c", "T1"),
    "TC": ("T1c", "T2", "FLAIR", "T1"),
    "NCR": ("T1c", "T2", "FLAIR", "T1"),
}

# BraTS file-name spellings of the same contrasts (2021: t1ce; 2023+: t1n, t1c, t2w, t2f).
_ALIASES = {"t1ce": "t1c", "t1gd": "t1c", "t1n": "t1", "t2w": "t2", "t2f": "flair"}


def _canon(name: str) -> str:
    k = str(name).strip().lower()
    return _ALIASES.get(k, k)


def _values_and_players(values, players):
    if hasattr(values, "values") and hasattr(values, "players"):  # a ShapleyResult
        players = players if players is not None else values.players
        values = values.values
    v = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values),
                        dtype=torch.float64)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    if v.ndim != 2 or v.shape[1] < 2:
        raise InputError(f"values must be (B, n_players) with at least 2 players; got shape {tuple(v.shape)}")
    return v, players


def resolve_ranking(reference, n: int, players: Sequence[str] | None = None) -> list[int]:
    """A ranking (most important first) as player indices, from indices, player names, or a region name
    of :data:`CLINICIAN_RANKINGS` (``"ET"``, ``"WT"``, ``"TC"``, ...; needs ``players``). Names match
    case-insensitively, with BraTS spellings (T1ce/T1Gd = T1c, T2f = FLAIR, T1n = T1, T2w = T2)."""
    if isinstance(reference, str):
        if reference.upper() in CLINICIAN_RANKINGS:
            reference = CLINICIAN_RANKINGS[reference.upper()]
        else:
            reference = [r for r in reference.split(",") if r.strip()]
    ref = list(reference)
    if ref and all(isinstance(r, str) for r in ref):
        if players is None:
            raise InputError("a ranking given by names needs the player names (players=...)")
        index = {_canon(p): i for i, p in enumerate(players)}
        missing = [r for r in ref if _canon(r) not in index]
        if missing:
            raise InputError(f"ranking names {missing} are not players {list(players)}")
        ref = [index[_canon(r)] for r in ref]
    ref = [int(r) for r in ref]
    if sorted(ref) != list(range(n)):
        raise InputError(f"the reference ranking must order all {n} players exactly once; got {ref}")
    return ref


def ranks_from_values(values) -> torch.Tensor:
    """(…, n) ranks of the players, 1 = largest value, ties get their average rank."""
    v = np.asarray(torch.as_tensor(values, dtype=torch.float64))
    return torch.as_tensor(stats.rankdata(-v, method="average", axis=-1), dtype=torch.float64)


def rank_agreement(values, reference_ranking, players: Sequence[str] | None = None,
                   tied_groups: Sequence[Sequence[Union[int, str]]] = ()) -> dict[str, torch.Tensor]:
    """Agreement of each sample's contrast ranking (order of its Shapley values) with a reference ranking.

    ``values``: (B, n) (or a :class:`~medexplain.segmentation.shapley.ShapleyResult`, whose player names are used).
    ``reference_ranking``: players most important first, as indices or names, a region name of
    :data:`CLINICIAN_RANKINGS`, or a (B, n) tensor of per-sample rankings. Returns float64 tensors (B,):
    ``kendall_tau`` (tau-b of the values against the reference order), ``spearman_rho``, and ``top1``
    (1.0 when the largest value belongs to the reference's first player; ties go to the lower index)
    and ``somers_d`` (below). ``tied_groups``: groups of players the reference does not order (e.g.
    ``ds.meta_info["ranking_ties"]`` of the planted contrast set): they share their average reference
    score and any of them counts as the reference's top. Tau-b and rho then account for the tie, so
    their maximum falls below 1 (tau-b 5/sqrt(30) = 0.913 for one tied pair among 4); ``somers_d`` =
    (concordant - discordant) / (pairs the reference orders), Somers' D of the values given the
    reference, is 1 for a perfect match of such a partial ranking and equals tau when there are no tied
    groups. Cases whose values are all equal have no ranking: NaN tau, rho and D.
    """
    v, players = _values_and_players(values, players)
    b, n = v.shape
    if isinstance(reference_ranking, (torch.Tensor, np.ndarray)) and np.asarray(reference_ranking).ndim == 2:
        refs = [resolve_ranking(np.asarray(r).tolist(), n) for r in np.asarray(reference_ranking)]
        if len(refs) != b:
            raise InputError(f"{len(refs)} reference rankings for {b} samples")
    else:
        refs = [resolve_ranking(reference_ranking, n, players)] * b
    tie_groups = []
    for g in tied_groups:
        if any(isinstance(p, str) for p in g):
            if players is None:
                raise InputError("tie groups given by names need the player names (players=...)")
            index = {_canon(p): j for j, p in enumerate(players)}
            if any(_canon(p) not in index for p in g if isinstance(p, str)):
                raise InputError(f"tie group {list(g)} names players not in {list(players)}")
            g = [index[_canon(p)] if isinstance(p, str) else p for p in g]
        g = [int(p) for p in g]
        if len(g) < 2 or min(g) < 0 or max(g) >= n:
            raise InputError(f"a tie group needs 2 or more of the {n} players, got {g}")
        tie_groups.append(g)
    tau, rho, top, somers = (torch.full((b,), float("nan"), dtype=torch.float64) for _ in range(4))
    iu = np.triu_indices(n, 1)
    order = torch.argsort(-v, dim=1, stable=True)
    for i, ref in enumerate(refs):
        score = np.empty(n)
        score[ref] = np.arange(n, 0, -1)           # reference: first player gets the highest score
        best = {ref[0]}
        for g in tie_groups:
            score[g] = score[g].mean()
            if ref[0] in g:
                best.update(g)
        row = v[i].numpy()
        top[i] = float(int(order[i, 0]) in best)
        if np.ptp(row) == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tau[i] = float(stats.kendalltau(row, score).statistic)
            rho[i] = float(stats.spearmanr(row, score).statistic)
        ref_sign = np.sign(score[:, None] - score[None, :])[iu]
        val_sign = np.sign(row[:, None] - row[None, :])[iu]
        somers[i] = float((ref_sign * val_sign).sum() / np.count_nonzero(ref_sign))
    return {"kendall_tau": tau, "spearman_rho": rho, "top1": top, "somers_d": somers}


def rank_uncertainty(values_per_fold, ddof: int = 0, per_player: bool = False) -> torch.Tensor:
    """Shapley rank uncertainty: the variance of each contrast's rank across fold models, averaged over
    the contrasts (Ren et al. 2025).

    ``values_per_fold``: (F, B, n), a list of F (B, n) tensors or ShapleyResults (one per fold model on
    the same B cases), or (F, n) for a single case. Ranks: 1 = largest value, ties averaged. ``ddof``: 0
    (population variance over the F folds, default) or 1. Returns (B,), or (B, n) per contrast with
    ``per_player=True``.
    """
    if isinstance(values_per_fold, (list, tuple)):
        v = torch.stack([_values_and_players(f, None)[0] for f in values_per_fold])
    else:
        v = torch.as_tensor(np.asarray(values_per_fold), dtype=torch.float64)
        if v.ndim == 2:
            v = v.unsqueeze(1)
    if v.ndim != 3 or v.shape[0] < 2:
        raise InputError(f"values_per_fold must be (F >= 2 folds, B, n); got shape {tuple(v.shape)}")
    if v.shape[0] <= ddof:
        raise InputError(f"{v.shape[0]} folds cannot give a variance with ddof={ddof}")
    var = ranks_from_values(v).var(0, correction=ddof)
    return var if per_player else var.mean(1)


def _pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(torch.as_tensor(a, dtype=torch.float64)).ravel()
    b = np.asarray(torch.as_tensor(b, dtype=torch.float64)).ravel()
    if a.shape != b.shape:
        raise InputError(f"need one value per case in both: {a.shape[0]} vs {b.shape[0]}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def pearson_with_dice(metric, dice) -> dict[str, float]:
    """Pearson r (and two-sided p) between a case-level metric (e.g. rank variance) and Dice; NaN cases
    dropped. The paper: rank variance vs Dice, r = -0.581 (U-Net)."""
    m, d = _pairs(metric, dice)
    if m.size < 3 or np.ptp(m) == 0 or np.ptp(d) == 0:
        return {"r": float("nan"), "p": float("nan"), "n": int(m.size)}
    res = stats.pearsonr(m, d)
    return {"r": float(res.statistic), "p": float(res.pvalue), "n": int(m.size)}


def agreement_by_dice(agreement, dice, threshold: float = 0.6, alternative: str = "two-sided") -> dict[str, float]:
    """Compare an agreement measure between cases with Dice > ``threshold`` and Dice <= ``threshold``
    with the Mann-Whitney U test (the paper: agreement is higher when Dice > 0.6). ``alternative`` as in
    :func:`scipy.stats.mannwhitneyu` ("greater": high-Dice cases agree more). Returns group sizes, means,
    medians, U (of the high group) and p; U and p are NaN when a group is empty."""
    a, d = _pairs(agreement, dice)
    hi, lo = a[d > threshold], a[d <= threshold]
    out = {"threshold": float(threshold), "n_high": int(hi.size), "n_low": int(lo.size),
           "mean_high": float(hi.mean()) if hi.size else float("nan"),
           "mean_low": float(lo.mean()) if lo.size else float("nan"),
           "median_high": float(np.median(hi)) if hi.size else float("nan"),
           "median_low": float(np.median(lo)) if lo.size else float("nan"),
           "u": float("nan"), "p": float("nan"), "alternative": alternative}
    if hi.size and lo.size:
        res = stats.mannwhitneyu(hi, lo, alternative=alternative)
        out["u"], out["p"] = float(res.statistic), float(res.pvalue)
    return out
