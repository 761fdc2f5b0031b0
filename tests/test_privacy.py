"""The formal bound on a release: the analytic Gaussian mechanism (Balle & Wang 2018)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from latentfuse.evaluation import (
    analytic_gaussian_epsilon,
    classical_gaussian_epsilon,
    clip_latent_norm,
    gaussian_delta,
    release_privacy,
)
from latentfuse.method.privacy import log_normal_cdf, normal_cdf

DELTA = 1e-5
CLIP_NORM = 40.0  # an L2 bound on latents: (4, 16, 16) ones of unit variance have norm ~32


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()


@pytest.mark.parametrize("x", [-3.0, -20.0, -34.9, -35.1, -36.0])
def test_log_normal_cdf_is_continuous_across_the_tail_switch(x):
    # Above the switch it is log(erfc); just below, the series must agree with it.
    exact = math.log(0.5 * math.erfc(-x / math.sqrt(2)))
    assert log_normal_cdf(x) == pytest.approx(exact, rel=1e-12)


def test_log_normal_cdf_is_finite_far_in_the_tail():
    assert math.isfinite(log_normal_cdf(-1e4)) and normal_cdf(-1e4) == 0.0


@pytest.mark.parametrize(("sensitivity", "sigma"), [(1.0, 1.0), (0.1, 1.0), (5.0, 0.3), (80, 0.01)])
def test_delta_holds_at_epsilon_and_fails_just_below(sensitivity, sigma):
    epsilon = analytic_gaussian_epsilon(sensitivity, sigma, DELTA)
    assert 0 < epsilon < math.inf
    assert gaussian_delta(epsilon, sensitivity, sigma) <= DELTA
    assert gaussian_delta(epsilon * (1 - 1e-6), sensitivity, sigma) > DELTA


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2])
def test_analytic_epsilon_beats_the_classical_bound(ratio):
    classical = classical_gaussian_epsilon(ratio, 1.0, DELTA)
    assert classical < 1, "the classical bound only applies for eps < 1"
    assert analytic_gaussian_epsilon(ratio, 1.0, DELTA) < classical


def test_tiny_sensitivity_gives_zero_epsilon():
    assert analytic_gaussian_epsilon(1e-8, 1.0, DELTA) == 0.0


def test_epsilon_falls_as_the_cut_moves_to_more_noise(alphas_cumprod):
    cuts = [1, 10, 50, 100, 200, 400, 700, 999]
    epsilons = [release_privacy(alphas_cumprod, t, CLIP_NORM, DELTA)["epsilon"] for t in cuts]
    assert all(math.isfinite(e) for e in epsilons)
    assert all(a > b for a, b in zip(epsilons, epsilons[1:], strict=False))


def test_global_model_has_no_privacy_and_independent_clients_release_nothing(alphas_cumprod):
    gm = release_privacy(alphas_cumprod, 0, CLIP_NORM, DELTA)
    assert gm["epsilon"] == math.inf and gm["noise_std"] == 0
    assert release_privacy(alphas_cumprod, 1000, CLIP_NORM, DELTA)["epsilon"] == 0.0


def test_release_is_a_gaussian_mechanism_with_the_stated_parameters(alphas_cumprod):
    report = release_privacy(alphas_cumprod, 100, CLIP_NORM, DELTA)
    abar = float(alphas_cumprod[99])
    assert report["sensitivity"] == pytest.approx(2 * CLIP_NORM * math.sqrt(abar))
    assert report["noise_std"] == pytest.approx(math.sqrt(1 - abar))
    expected = analytic_gaussian_epsilon(report["sensitivity"], report["noise_std"], DELTA)
    assert report["epsilon"] == expected


def test_fresh_releases_compose_as_one_mechanism_with_sqrt_k_sensitivity(alphas_cumprod):
    once = release_privacy(alphas_cumprod, 300, CLIP_NORM, DELTA)
    fresh = release_privacy(alphas_cumprod, 300, CLIP_NORM, DELTA, "fresh", releases_per_image=9)
    assert fresh["composed_sensitivity"] == pytest.approx(3 * once["sensitivity"])
    direct = analytic_gaussian_epsilon(3 * once["sensitivity"], once["noise_std"], DELTA)
    assert fresh["epsilon"] == pytest.approx(direct) and fresh["epsilon"] > once["epsilon"]
    ignored = release_privacy(alphas_cumprod, 300, CLIP_NORM, DELTA, "once", releases_per_image=9)
    assert ignored["epsilon"] == once["epsilon"]  # `once` reuses one z_r: no composition


def test_clip_latent_norm_bounds_every_latent():
    latents = torch.randn(5, 4, 8, 8) * torch.tensor([0.1, 1, 5, 10, 50]).view(5, 1, 1, 1)
    clipped = clip_latent_norm(latents, 20.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert (norms <= 20.0 + 1e-4).all()
    small = latents.flatten(1).norm(dim=1) <= 20
    torch.testing.assert_close(clipped[small], latents[small])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_cut": 1001}, "t_cut"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"policy": "sometimes"}, "policy"),
        ({"delta": 0.0}, "delta"),
    ],
)
def test_bad_arguments_are_named(alphas_cumprod, kwargs, message):
    arguments = {"t_cut": 100, "clip_norm": CLIP_NORM, "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=message):
        release_privacy(alphas_cumprod, **arguments)


SCHEDULE = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.mark.parametrize("target", [1.0, 8.0, 64.0])
@pytest.mark.parametrize(("policy", "releases"), [("once", 1), ("fresh", 4)])
def test_private_t_cut_is_the_smallest_cut_that_meets_the_target(target, policy, releases):
    from latentfuse.method.privacy import private_t_cut

    cut = private_t_cut(SCHEDULE, 30.0, target, 1e-5, policy, releases)
    k = 1 if policy == "once" else releases
    assert release_privacy(SCHEDULE, cut, 30.0, 1e-5, policy, k)["epsilon"] <= target
    assert release_privacy(SCHEDULE, cut - 1, 30.0, 1e-5, policy, k)["epsilon"] > target


def test_release_guarantee_needs_enforced_clipping():
    from latentfuse.method.privacy import release_guarantee

    assert release_guarantee(SCHEDULE, 500, 0.0, 1e-5, "once", 0)["status"].startswith(
        "not applicable"
    )
    assert release_guarantee(SCHEDULE, 500, 30.0, 1e-5, "once", 0)["epsilon"] > 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["privacy.target_epsilon=8"], "privacy.clip_norm"),
        (['split.release_policy="fresh"', "privacy.clip_norm=30"], "privacy.max_releases"),
        (["privacy.delta=1"], "privacy.delta"),
    ],
)
def test_privacy_config_names_the_bad_field(overrides, field):
    from latentfuse.config import load_config

    with pytest.raises(ValueError, match=field):
        load_config(None, overrides)


def test_gaussian_dp_reading_of_the_formal_mode(alphas_cumprod):
    """mu = D / s; the worst-case membership AUC Phi(mu / sqrt 2) and TPR Phi(Phi^-1(a) + mu):
    at cut 892 with clip 46.66 (the privacy sweep's epsilon-8 point) mu is 1.66 and the bound
    on AUC about 0.88, far from the 0.5 an (8, 1e-5) reading suggests."""
    from latentfuse.method.privacy import normal_cdf, normal_quantile

    report = release_privacy(alphas_cumprod, 892, 46.66, DELTA)
    gdp = report["gaussian_dp"]
    assert gdp["mu"] == pytest.approx(report["sensitivity"] / report["noise_std"])
    assert gdp["mu"] == pytest.approx(1.66, abs=0.01)
    assert gdp["membership_auc_bound"] == pytest.approx(0.88, abs=0.005)
    assert normal_quantile(normal_cdf(-2.3263)) == pytest.approx(-2.3263, abs=1e-9)
    assert gdp["tpr_bound"]["0.01"] == pytest.approx(normal_cdf(-2.326348 + gdp["mu"]), abs=1e-5)
