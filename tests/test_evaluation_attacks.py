"""The attacker suite: each attacker wins where the release discloses its image and falls to
chance where it does not, so a broken attacker (or a leaking release) shows."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from latentfuse.evaluation.attacks import (
    likelihood_reidentification,
    model_membership,
    posterior_mean,
    release_membership,
)
from latentfuse.evaluation.statistics import binomial_summary, roc_auc, roc_summary, tpr_at_fpr
from latentfuse.method.release_key import release_noise

T = 1000
SHAPE = (4, 4, 4)
ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
KEY = bytes(32)


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def releases_of(z0: torch.Tensor, t_cut: int) -> torch.Tensor:
    abar = float(ALPHAS[t_cut - 1])
    eps = release_noise(KEY, 0, range(len(z0)), 0, SHAPE, t_cut).float()
    return math.sqrt(abar) * z0 + math.sqrt(1 - abar) * eps


def test_roc_auc_counts_pairs():
    pos, neg = np.array([0.9, 0.4, 0.7]), np.array([0.5, 0.4, 0.1, 0.8])
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))


def test_tpr_at_fpr_keeps_the_false_positive_rate():
    neg = np.arange(1000) / 1000  # scores 0 .. 0.999
    pos = np.array([0.9995, 0.995, 0.5])
    assert tpr_at_fpr(pos, neg, 0.001) == pytest.approx(1 / 3)  # only 0.9995 beats 0.999
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(pos, neg[:50], 0.001) is None  # 50 negatives cannot resolve 0.1%


def test_binomial_summary_tests_against_chance():
    at_chance = binomial_summary(5, 160, 1 / 32)
    assert at_chance["p_value"] > 0.05 and at_chance["ci"][0] < 1 / 32 < at_chance["ci"][1]
    assert binomial_summary(80, 160, 1 / 32)["p_value"] < 1e-30


def test_binomial_interval_is_two_sided():
    """A rate of 0.07 over 2,500 trials has an upper bound near 0.08, not 1."""
    low, high = binomial_summary(175, 2500, 1 / 32)["ci"]
    assert 0.059 < low < 0.07 < high < 0.081
    assert binomial_summary(0, 2500, 1e-4)["ci"] == [0.0, pytest.approx(0.00147, rel=0.01)]


@pytest.mark.parametrize(("t_cut", "identifies"), [(100, True), (999, False)])
@pytest.mark.parametrize("gallery_size", [8, None])
def test_likelihood_reidentification(t_cut, identifies, gallery_size):
    """At a low cut every release is matched to its source; at t_cut = 999 (abar_r ~ 4e-5) the
    rate is indistinguishable from chance."""
    z0 = latents(64, 0)
    result = likelihood_reidentification(
        releases_of(z0, t_cut), torch.arange(64), z0, float(ALPHAS[t_cut - 1]), gallery_size
    )
    assert result["chance"] == pytest.approx(1 / (gallery_size or 64))
    if identifies:
        assert result["rate"] == 1.0 and result["p_value"] < 1e-20
    else:
        assert result["p_value"] > 1e-3


@pytest.mark.parametrize(("t_cut", "low", "high"), [(50, 0.99, 1.0), (999, 0.35, 0.65)])
def test_release_membership(t_cut, low, high):
    """Members (whose releases are held among those of 1,000 client images) are told from
    held-out images at a low cut only; the reported score is the stronger of the two."""
    client, outsiders = latents(1000, 1), latents(200, 2)
    result = release_membership(
        releases_of(client, t_cut), client[:200], outsiders, float(ALPHAS[t_cut - 1])
    )
    assert low <= result["auc"]["value"] <= high
    assert result["auc"]["ci"][0] <= result["auc"]["value"] <= result["auc"]["ci"][1]
    assert result["auc"]["value"] == max(result["auc_by_score"].values())


def test_release_membership_posterior_removes_the_noise_energy():
    """At t_cut 300 each release's noise energy varies more than a member's distance advantage:
    the distance score loses pairs that the posterior over the pool (which cancels it) wins."""
    client, outsiders = latents(1000, 1), latents(200, 2)
    result = release_membership(
        releases_of(client, 300), client[:200], outsiders, float(ALPHAS[299])
    )
    assert result["score"] == "posterior" and result["auc"]["value"] > 0.97
    assert result["auc_by_score"]["distance"] < result["auc"]["value"] - 0.03


def test_posterior_logits_match_the_softmax():
    from latentfuse.evaluation.attacks import _posterior_logits

    log_l = torch.tensor([[0.0, -1.0, -3.0], [-800.0, 0.0, -2.0]], dtype=torch.float64)
    # logit_ij = L_ij - logsumexp_{k != j} L_ik, by its definition (p_ij near 0 or 1 included)
    expected = torch.stack(
        [
            torch.stack(
                [row[j] - torch.cat([row[:j], row[j + 1 :]]).logsumexp(0) for j in range(3)]
            )
            for row in log_l
        ]
    )
    torch.testing.assert_close(_posterior_logits(log_l), expected)


class Memoriser(torch.nn.Module):
    """A denoiser that has memorised `members`: eps from the nearest member's forward process."""

    def __init__(self, members: torch.Tensor):
        super().__init__()
        self.members = torch.nn.Parameter(members.clone(), requires_grad=False)

    def forward(self, z_s, timestep, class_labels=None):
        a = ALPHAS[timestep.long()].view(-1, 1, 1, 1).to(z_s.dtype)
        scaled = a.sqrt()[:, None] * self.members[None]  # (b, m, c, h, w)
        nearest = (z_s[:, None] - scaled).flatten(2).pow(2).sum(2).argmin(1)
        z0 = self.members[nearest]
        eps = (z_s - a.sqrt() * z0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps})()


@pytest.mark.parametrize(("memorised", "low", "high"), [(True, 0.9, 1.0), (False, 0.3, 0.7)])
def test_model_membership_detects_a_memorising_model(memorised, low, high):
    """Loss-based membership wins against a model that memorised its members, and sits at
    chance against one that memorised other images."""
    members, outsiders = latents(40, 3), latents(40, 4)
    unet = Memoriser(members if memorised else latents(40, 5))
    result = model_membership(unet, ALPHAS, members, outsiders, t_cut=50, num_draws=2)
    assert low <= result["auc"]["value"] <= high


def test_posterior_mean_of_an_exact_denoiser_is_the_source():
    """With a denoiser that knows z0 the posterior mean is z0; at t_cut = 0 it is the release."""
    z0 = latents(6, 6)
    z_r = releases_of(z0, 100)
    estimate = posterior_mean(Memoriser(z0), ALPHAS, z_r, 100)
    torch.testing.assert_close(estimate, z0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(posterior_mean(Memoriser(z0), ALPHAS, z0, 0), z0)


def test_roc_summary_reports_chance_baselines():
    rng = np.random.default_rng(0)
    result = roc_summary(rng.normal(size=500), rng.normal(size=2000))
    assert result["auc"]["chance"] == 0.5 and result["tpr@0.01"]["chance"] == 0.01
    assert result["auc"]["ci"][0] < 0.5 < result["auc"]["ci"][1]
