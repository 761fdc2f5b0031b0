"""A formal bound on what a release discloses: the analytic Gaussian mechanism.

With every latent clipped to L2 norm C, a `once` release
z_r = sqrt(abar_r) z0 + sqrt(1 - abar_r) eps (method.md §2) is the Gaussian mechanism
f(z0) + N(0, s^2 I) with f = sqrt(abar_r) z0: replacing one image moves f by at most
D = 2 C sqrt(abar_r), and s = sqrt(1 - abar_r). Balle & Wang (2018, "Improving the Gaussian
mechanism for differential privacy", Theorem 8): it is (eps, delta)-DP iff

    Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D) <= delta.

Under `fresh`, k releases of one image with independent noise compose to one Gaussian
mechanism with sensitivity D sqrt(k) and the same s.
"""

from __future__ import annotations

import math

import torch

DEFAULT_DELTA = 1e-5
_SQRT2 = math.sqrt(2.0)
_TAIL = -35.0  # below this, erfc underflows soon: use the asymptotic series of log Phi


def normal_cdf(x: float) -> float:
    """Phi(x) via erfc: no cancellation in the lower tail."""
    return 0.5 * math.erfc(-x / _SQRT2)


def log_normal_cdf(x: float) -> float:
    """log Phi(x), finite however far into the lower tail x lies."""
    if x > _TAIL:
        return math.log(normal_cdf(x))
    # Phi(x) = phi(x)/(-x) (1 - 1/x^2 + 3/x^4 - 15/x^6 + 105/x^8 - ...), x -> -inf.
    inv2 = 1.0 / (x * x)
    series = 1 - inv2 + 3 * inv2**2 - 15 * inv2**3 + 105 * inv2**4
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log(series)


def gaussian_delta(epsilon: float, sensitivity: float, sigma: float) -> float:
    """The smallest delta for which N(f, sigma^2) with L2 sensitivity D is (eps, delta)-DP."""
    ratio = sensitivity / sigma  # D/s
    upper = normal_cdf(ratio / 2 - epsilon / ratio)
    # e^eps Phi(-D/(2s) - eps s/D) in log space; the exponent never exceeds 0.
    lower = math.exp(epsilon + log_normal_cdf(-ratio / 2 - epsilon / ratio))
    return upper - lower


def analytic_gaussian_epsilon(
    sensitivity: float, sigma: float, delta: float = DEFAULT_DELTA, rtol: float = 1e-12
) -> float:
    """The smallest eps with gaussian_delta(eps) <= delta, by bisection (Balle & Wang 2018)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if sensitivity < 0 or sigma < 0:
        raise ValueError(f"sensitivity and sigma must be >= 0, got {sensitivity}, {sigma}")
    if sensitivity == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if gaussian_delta(0.0, sensitivity, sigma) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, sensitivity, sigma) > delta:  # decreasing in eps
        low, high = high, 2 * high
    while high - low > rtol * high:
        middle = (low + high) / 2
        if gaussian_delta(middle, sensitivity, sigma) > delta:
            low = middle
        else:
            high = middle
    return high  # satisfies the constraint; anything below by more than rtol does not


def normal_quantile(p: float) -> float:
    """Phi^-1(p) by bisection on `normal_cdf` (p in (0, 1))."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    low, high = -40.0, 40.0
    for _ in range(200):
        middle = (low + high) / 2
        if normal_cdf(middle) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def gaussian_dp(sensitivity: float, sigma: float, fprs: tuple[float, ...] = (0.01, 0.001)) -> dict:
    """The Gaussian mechanism read as mu-GDP (Dong, Roth & Su 2022): mu = D / s, and what that
    allows the strongest membership test: AUC at most Phi(mu / sqrt 2) and, at false-positive
    rate a, a true-positive rate at most Phi(Phi^-1(a) + mu). Unlike (eps, delta), this bound
    is not vacuous at large eps (eps 8 is e^8 = 2981 on the likelihood ratio)."""
    if sigma <= 0:
        return {"mu": None, "membership_auc_bound": 1.0, "tpr_bound": {str(a): 1.0 for a in fprs}}
    mu = sensitivity / sigma
    return {
        "mu": mu,
        "membership_auc_bound": normal_cdf(mu / _SQRT2),
        "tpr_bound": {str(a): normal_cdf(normal_quantile(a) + mu) for a in fprs},
    }


def classical_gaussian_epsilon(sensitivity: float, sigma: float, delta: float) -> float:
    """The textbook bound eps = sqrt(2 ln(1.25/delta)) D/s (Dwork & Roth), valid for eps < 1."""
    return math.sqrt(2 * math.log(1.25 / delta)) * sensitivity / sigma


def clip_latent_norm(latents: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each latent (b, ...) down to L2 norm <= max_norm: the bound's premise."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norms = latents.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (max_norm / norms).clamp(max=1.0)
    return latents * scale.view(-1, *([1] * (latents.ndim - 1)))


def release_privacy(
    alphas_cumprod: torch.Tensor,
    t_cut: int,
    clip_norm: float,
    delta: float = DEFAULT_DELTA,
    policy: str = "once",
    releases_per_image: int = 1,
) -> dict:
    """(eps, delta) of one image's releases at cut `t_cut`, latents clipped to `clip_norm`."""
    num_train_timesteps = len(alphas_cumprod)
    if not 0 <= t_cut <= num_train_timesteps:
        raise ValueError(f"t_cut must lie in [0, {num_train_timesteps}], got {t_cut}")
    if policy not in ("once", "fresh"):
        raise ValueError(f"policy must be 'once' or 'fresh', got {policy!r}")
    if releases_per_image < 1:
        raise ValueError(f"releases_per_image must be >= 1, got {releases_per_image}")
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    k = 1 if policy == "once" else releases_per_image
    report = {"t_cut": t_cut, "delta": delta, "clip_norm": clip_norm, "policy": policy}
    report["releases_per_image"] = k
    if t_cut == num_train_timesteps:
        return {**report, "epsilon": 0.0, "status": "t_cut = T: nothing is released"}
    abar = 1.0 if t_cut == 0 else float(alphas_cumprod[t_cut - 1])  # abar_r, r = t_cut - 1
    sensitivity = 2 * clip_norm * math.sqrt(abar)
    sigma = math.sqrt(max(1.0 - abar, 0.0))
    composed = sensitivity * math.sqrt(k)  # k Gaussian releases = one with D sqrt(k)
    epsilon = analytic_gaussian_epsilon(composed, sigma, delta)
    status = "ok" if sigma > 0 else "t_cut = 0 releases clean latents: no privacy"
    return {
        **report,
        "epsilon": epsilon,
        "release_level": t_cut - 1,
        "abar_release": abar,
        "sensitivity": sensitivity,
        "composed_sensitivity": composed,
        "noise_std": sigma,
        "gaussian_dp": gaussian_dp(composed, sigma),
        "status": status,
    }


def releases_per_image(policy: str, max_releases: int) -> int:
    """How many releases of one image a guarantee composes over: 1 under `once`."""
    return 1 if policy == "once" else max_releases


def private_t_cut(
    alphas_cumprod: torch.Tensor,
    clip_norm: float,
    target_epsilon: float,
    delta: float,
    policy: str = "once",
    max_releases: int = 1,
) -> int:
    """The smallest cut whose releases of latents clipped to `clip_norm` are
    (target_epsilon, delta)-DP per image, composed over the releases `policy` makes.

    epsilon falls as the cut rises (abar_r falls), so a bisection finds it; t_cut = T
    releases nothing and always qualifies."""
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    k = releases_per_image(policy, max_releases)

    def epsilon(t_cut: int) -> float:
        return release_privacy(alphas_cumprod, t_cut, clip_norm, delta, policy, k)["epsilon"]

    low, high = 0, len(alphas_cumprod)  # epsilon(high) = 0 <= target
    while low < high:
        middle = (low + high) // 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle + 1
    return high


def release_guarantee(
    alphas_cumprod: torch.Tensor,
    t_cut: int,
    clip_norm: float,
    delta: float,
    policy: str,
    max_releases: int,
) -> dict:
    """What one client's releases guarantee: the (epsilon, delta) of the analytic Gaussian
    mechanism where clipping to `clip_norm` is enforced, else "not applicable"."""
    if t_cut == len(alphas_cumprod):
        return {"epsilon": 0.0, "t_cut": t_cut, "status": "t_cut = T: nothing is released"}
    if clip_norm <= 0:
        return {"epsilon": None, "status": "not applicable: latents are not clipped"}
    if policy == "fresh" and max_releases < 1:
        return {"epsilon": None, "status": "not applicable: fresh releases are not capped"}
    k = releases_per_image(policy, max_releases)
    report = release_privacy(alphas_cumprod, t_cut, clip_norm, delta, policy, k)
    report["epsilon"] = report["epsilon"] if math.isfinite(report["epsilon"]) else None
    return report


def guarantee_record(config, alphas_cumprod: torch.Tensor, cuts: dict[int, int]) -> dict:
    """collafuse.json's "privacy": the threat model and each client's guarantee at its cut
    (`config` is the RunConfig; `cuts` maps client id to its release cut)."""
    p = config.privacy
    return {
        "threat_model": "honest-but-curious server holding every release, the run config and "
        "its own model, never a client's release key",
        "release_noise": "keyed PRF of (client, image id, epoch) under each client's secret key",
        "clip_norm": p.clip_norm or None,
        "target_epsilon": p.target_epsilon or None,
        "clients": {
            str(cid): release_guarantee(
                alphas_cumprod.double(),
                t_cut,
                p.clip_norm,
                p.delta,
                config.split.release_policy,
                p.max_releases,
            )
            for cid, t_cut in cuts.items()
        },
    }
