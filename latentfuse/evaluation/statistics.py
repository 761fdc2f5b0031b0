"""Uncertainty for attack figures: binomial intervals and tests, ROC summaries, bootstraps."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

CONFIDENCE = 0.95
NUM_BOOTSTRAP = 500


def binomial_summary(hits: int, trials: int, chance: float) -> dict:
    """A success rate with its Clopper-Pearson 95% interval and the one-sided exact binomial
    p-value against `chance` (H0: the attacker does no better than guessing)."""
    if trials < 1:
        return {"rate": None, "ci": [None, None], "p_value": None, "chance": chance, "n": 0}
    # The interval is two-sided; only the test is one-sided (a proportion_ci of the
    # alternative="greater" test would be one-sided, its upper end always 1).
    interval = stats.binomtest(hits, trials).proportion_ci(CONFIDENCE, method="exact")
    p_value = stats.binomtest(hits, trials, chance, alternative="greater").pvalue
    return {
        "rate": hits / trials,
        "ci": [float(interval.low), float(interval.high)],
        "p_value": float(p_value),
        "chance": chance,
        "hits": hits,
        "n": trials,
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + P(tie)/2 (Mann-Whitney U over n_pos n_neg)."""
    ranks = stats.rankdata(np.concatenate([positive, negative]))
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float | None:
    """The true-positive rate at the threshold whose false-positive rate is at most `fpr`;
    None when fewer than 1/fpr negatives make that rate unresolvable."""
    if len(negative) * fpr < 1:
        return None
    allowed = math.floor(fpr * len(negative))  # negatives that may score above the threshold
    threshold = np.sort(negative)[::-1][allowed] if allowed < len(negative) else -np.inf
    return float((positive > threshold).mean())


def roc_summary(
    positive: torch.Tensor | np.ndarray,
    negative: torch.Tensor | np.ndarray,
    fprs: tuple[float, ...] = (0.01, 0.001),
    seed: int = 0,
) -> dict:
    """AUC and TPR at each FPR (Carlini et al. 2022), each with a bootstrap 95% interval over
    both sets; chance is AUC 0.5 and TPR = FPR."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    rng = np.random.default_rng(seed)
    draws = {"auc": [], **{f"tpr@{f:g}": [] for f in fprs}}
    for _ in range(NUM_BOOTSTRAP):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        draws["auc"].append(roc_auc(p, n))
        for f in fprs:
            draws[f"tpr@{f:g}"].append(tpr_at_fpr(p, n, f))
    result = {"auc": {"value": roc_auc(pos, neg), "ci": _interval(draws["auc"]), "chance": 0.5}}
    for f in fprs:
        name = f"tpr@{f:g}"
        value = tpr_at_fpr(pos, neg, f)
        ci = [None, None] if value is None else _interval(draws[name])
        result[name] = {"value": value, "ci": ci, "chance": f}
    result.update(num_positive=len(pos), num_negative=len(neg))
    return result


def bootstrap_mean(values: torch.Tensor | np.ndarray, seed: int = 0) -> dict:
    """The mean of `values` with a bootstrap 95% interval."""
    x = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = [rng.choice(x, len(x)).mean() for _ in range(NUM_BOOTSTRAP)]
    return {"value": float(x.mean()), "ci": _interval(means), "n": len(x)}


def _interval(values: list) -> list[float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return [None, None]
    low, high = np.percentile(values, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return [float(low), float(high)]
