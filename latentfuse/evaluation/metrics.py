"""FID, KID and FCD from feature sets, with clean-fid's maths.

Fréchet distance: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (clean-fid's
`frechet_distance`). With fewer samples n than feature dimensions d, one covariance has rank
< n and the trace of the matrix square root has an exact small form: for S1 = A^T A / (n-1),
A the centred features (n, d), the non-zero eigenvalues of S1 S2 are those of the symmetric
(n, n) matrix A S2 A^T / (n-1), so Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i). That is the same
number as scipy's 2048x2048 `sqrtm` at a fraction of the cost; with n >= d clean-fid's own
function runs.

KID: clean-fid's `kernel_distance` (cubic polynomial kernel, 100 subsets of at most 1000),
with a seeded generator and the spread over subsets as `kid_std`. With few samples KID stays
unbiased; FID is biased upward, so every score is reported beside its sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class FeatureStats:
    """A feature set (n, d) with its mean (d,) and covariance (d, d), all float64 but features."""

    features: np.ndarray  # (n, d) float32
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Mean and covariance (ddof=1, as clean-fid's np.cov) of `features` (n, d)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise ValueError(f"features must have shape (n, d), got {features.shape}")
        f64 = features.astype(np.float64)
        n, d = f64.shape
        mu = f64.mean(axis=0) if n else np.zeros(d)
        sigma = np.cov(f64, rowvar=False) if n >= 2 else np.full((d, d), np.nan)
        return cls(features, mu, np.atleast_2d(sigma))

    @property
    def count(self) -> int:
        """Number of samples n."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return int(self.features.shape[1])

    def concat(self, other: FeatureStats) -> FeatureStats:
        """The pooled feature set of both."""
        return FeatureStats.from_features(np.concatenate([self.features, other.features]))


def _trace_sqrt_low_rank(small: FeatureStats, other: FeatureStats) -> float:
    """Tr (S_small S_other)^(1/2) from the smaller set's centred features (exact)."""
    centred = small.features.astype(np.float64) - small.mu  # (n, d)
    inner = centred @ other.sigma @ centred.T / (small.count - 1)  # (n, n), symmetric PSD
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (FID, FCD)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} and {b.dim}")
    if min(a.count, b.count) < 2:
        raise ValueError(
            f"a Fréchet distance needs >= 2 samples per set, got {a.count} and {b.count}"
        )
    small, other = (a, b) if a.count <= b.count else (b, a)
    if small.count <= small.dim:
        diff = a.mu - b.mu
        trace = np.trace(a.sigma) + np.trace(b.sigma)
        value = diff @ diff + trace - 2 * _trace_sqrt_low_rank(small, other)
    else:
        from cleanfid.fid import frechet_distance as cleanfid_frechet

        value = cleanfid_frechet(a.mu, a.sigma, b.mu, b.sigma)
    return float(max(value, 0.0))  # rounding can push an exact 0 slightly below


def kernel_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) of two feature sets: cleanfid.fid.kernel_distance's maths.

    With `np.random.seed(seed)` before it, clean-fid's function returns the same mean.
    """
    features1 = np.asarray(features1, dtype=np.float64)
    features2 = np.asarray(features2, dtype=np.float64)
    n = features1.shape[1]
    m = min(features1.shape[0], features2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(
            f"KID needs >= 2 samples per set, got {features1.shape[0]} and {features2.shape[0]}"
        )
    rng = np.random.RandomState(seed)  # the legacy generator: clean-fid draws from np.random
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = features2[rng.choice(features2.shape[0], m, replace=False)]
        y = features1[rng.choice(features1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        values[i] = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    return float(values.mean()), float(values.std())


def distribution_scores(
    generated: FeatureStats, reference: FeatureStats, kid: bool = True, seed: int = 0
) -> dict:
    """FID (or FCD) and KID of `generated` against `reference`, with both sample counts."""
    scores: dict = {"num_generated": generated.count, "num_real": reference.count}
    try:
        scores["fd"], scores["fd_status"] = frechet_distance(generated, reference), "ok"
    except ValueError as error:
        scores["fd"], scores["fd_status"] = None, f"unavailable: {error}"
    if kid:
        try:
            mean, std = kernel_distance(generated.features, reference.features, seed=seed)
            scores["kid"], scores["kid_std"] = mean, std
        except ValueError:
            scores["kid"], scores["kid_std"] = None, None
    return scores
