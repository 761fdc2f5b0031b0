"""The cut point: ownership, the release, the server's exact objective and chain splitting.

The statistical tests draw many samples with a fixed seed and compare against the closed
forms of method.md §2; every tolerance is a number of standard errors of the estimate.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from latentfuse.config import SplitConfig
from latentfuse.method.split import (
    DiffusionSplit,
    client_start,
    client_train_cut,
    loss_weights,
    sample_client_timesteps,
    sample_server_timesteps,
)

T = 1000
NUM_SAMPLES = 200_000
NUM_FIT_SAMPLES = 1_000_000
Z_SCORE = 5.0  # tolerance in standard errors; a seeded 5-sigma miss would be a real bias
Z0_VALUES = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64)

# (t_cut, s): s = t_cut (largest lam_s), one step above, the middle, and s = T - 1.
CUT_AND_SERVER_STEP = [
    (t_cut, s)
    for t_cut in (0, 1, 20, 100, 500)
    for s in sorted({t_cut, t_cut + 1, (t_cut + T) // 2, T - 1})
]


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    """The diffusers training schedule every split here is cut from."""
    return DDPMScheduler(num_train_timesteps=T)


def make_split(scheduler: DDPMScheduler, t_cut: int) -> DiffusionSplit:
    """A split of the shared schedule."""
    return DiffusionSplit.from_scheduler(scheduler, t_cut)


def server_marginal(split: DiffusionSplit, s: int, objective: str) -> torch.Tensor:
    """z_s (NUM_SAMPLES, len(Z0_VALUES)) for fixed z0 values, through release and server noise."""
    g = torch.Generator().manual_seed(1234 + 7 * split.handoff_t + s)
    z0 = Z0_VALUES.expand(NUM_SAMPLES, -1)  # (n, k): one column per fixed z0
    eps_c = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    eps_s = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    z_r = split.release(z0, eps_c)
    z_s, _, _ = split.server_inputs(z_r, torch.full((NUM_SAMPLES,), s), eps_s, objective)
    return z_s


def marginal_z_scores(split: DiffusionSplit, s: int, z_s: torch.Tensor) -> torch.Tensor:
    """Per column: |mean - sqrt(abar_s) z0| and |var - (1 - abar_s)| in standard errors."""
    abar_s = float(split.alphas_cumprod[s])
    var = 1 - abar_s
    n = z_s.shape[0]
    mean_err = (z_s.mean(0) - abar_s**0.5 * Z0_VALUES).abs() / (var / n) ** 0.5
    var_err = (z_s.var(0) - var).abs() / (var * (2 / (n - 1)) ** 0.5)
    return torch.cat([mean_err, var_err])


@pytest.mark.parametrize(("t_cut", "s"), CUT_AND_SERVER_STEP)
def test_exact_server_latent_has_forward_marginal(scheduler, t_cut, s):
    """z_s ~ q(z_s | z0) = N(sqrt(abar_s) z0, 1 - abar_s) under the exact objective."""
    split = make_split(scheduler, t_cut)
    z_scores = marginal_z_scores(split, s, server_marginal(split, s, "exact"))
    assert z_scores.max() < Z_SCORE


@pytest.mark.parametrize(("t_cut", "s"), [(100, 100), (100, 300), (500, 500)])
def test_original_server_latent_misses_forward_marginal(scheduler, t_cut, s):
    """Control: the authors' double noising has the wrong marginal, and the check sees it."""
    split = make_split(scheduler, t_cut)
    z_scores = marginal_z_scores(split, s, server_marginal(split, s, "original"))
    assert z_scores.max() > 10 * Z_SCORE


def least_squares_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float]:
    """(slope, intercept, their standard errors) of y = slope * x + intercept."""
    x_mean, y_mean = x.mean(), y.mean()
    x_var = ((x - x_mean) ** 2).mean()
    slope = ((x - x_mean) * (y - y_mean)).mean() / x_var
    intercept = y_mean - slope * x_mean
    residual_std = (y - slope * x - intercept).std()
    n = len(x)
    slope_se = residual_std / (n * x_var) ** 0.5
    intercept_se = residual_std * (1 / n + x_mean**2 / (n * x_var)) ** 0.5
    return float(slope), float(intercept), float(slope_se), float(intercept_se)


def gaussian_fit_z_scores(split: DiffusionSplit, s: int, objective: str) -> list[float]:
    """How far a linear fit of the server target on z_s is from E[eps | z_s], in std errors.

    For z0 ~ N(mu, tau^2): E[eps | z_s] = sqrt(1-abar_s)(z_s - sqrt(abar_s) mu) /
    (abar_s tau^2 + 1 - abar_s) (method.md §2), linear in z_s.
    """
    mu, tau = 1.5, 0.5
    g = torch.Generator().manual_seed(99 + split.handoff_t + s)
    n = NUM_FIT_SAMPLES
    z0 = mu + tau * torch.randn((n, 1), generator=g, dtype=torch.float64)
    eps_c = torch.randn((n, 1), generator=g, dtype=torch.float64)
    eps_s = torch.randn((n, 1), generator=g, dtype=torch.float64)
    z_s, target, _ = split.server_inputs(
        split.release(z0, eps_c), torch.full((n,), s), eps_s, objective
    )
    abar_s = float(split.alphas_cumprod[s])
    slope = (1 - abar_s) ** 0.5 / (abar_s * tau**2 + 1 - abar_s)
    intercept = -slope * abar_s**0.5 * mu
    fit_slope, fit_intercept, slope_se, intercept_se = least_squares_fit(z_s[:, 0], target[:, 0])
    return [abs(fit_slope - slope) / slope_se, abs(fit_intercept - intercept) / intercept_se]


GAUSSIAN_CASES = [(100, 100), (100, 300), (500, 500), (500, 700)]


@pytest.mark.parametrize(("t_cut", "s"), GAUSSIAN_CASES)
def test_exact_target_regresses_to_posterior_noise(scheduler, t_cut, s):
    """The least-squares fit of lam_s eps_s on z_s recovers E[eps | z_s] for Gaussian data."""
    assert max(gaussian_fit_z_scores(make_split(scheduler, t_cut), s, "exact")) < Z_SCORE


@pytest.mark.parametrize(("t_cut", "s"), GAUSSIAN_CASES)
def test_original_target_does_not_regress_to_posterior_noise(scheduler, t_cut, s):
    """The authors' baseline learns something else: its fit misses E[eps | z_s] clearly."""
    assert max(gaussian_fit_z_scores(make_split(scheduler, t_cut), s, "original")) > 10 * Z_SCORE


@pytest.mark.parametrize("t_cut", [1, 20, 500, T - 1])
def test_target_scale_is_at_least_one_and_grows_towards_the_cut(scheduler, t_cut):
    """lam_s >= 1, lam_s is largest at s = t_cut and falls as s moves away from the cut."""
    split = make_split(scheduler, t_cut)
    s = torch.arange(t_cut, T)
    z = torch.zeros(len(s), 1, dtype=torch.float64)
    _, _, lam = split.server_inputs(z, s, z, "exact")
    assert torch.all(lam >= 1)
    assert torch.all(lam[1:] <= lam[:-1])


def test_exact_equals_original_for_global_model(scheduler):
    """At t_cut = 0 the release is clean, so both objectives noise it the same way."""
    split = make_split(scheduler, 0)
    g = torch.Generator().manual_seed(0)
    z_r, eps_s = torch.randn(8, 4, 2, 2, generator=g), torch.randn(8, 4, 2, 2, generator=g)
    s = torch.randint(0, T, (8,), generator=g)
    torch.testing.assert_close(
        split.server_inputs(z_r, s, eps_s, "exact"), split.server_inputs(z_r, s, eps_s, "original")
    )


def test_server_inputs_reject_client_timesteps(scheduler):
    """A server timestep below the cut is the client's: refused."""
    split = make_split(scheduler, 100)
    z = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="handoff_t=100"):
        split.server_inputs(z, torch.tensor([100, 99]), z, "exact")


def test_server_inputs_reject_unknown_objective(scheduler):
    """Only the named objectives exist."""
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="objective"):
        make_split(scheduler, 10).server_inputs(z, torch.tensor([10]), z, "approximate")


@pytest.mark.parametrize("t_cut", [0, 1, 100, T - 1, T])
def test_owner_is_client_below_cut_and_server_from_cut(scheduler, t_cut):
    """owner(t) = client for t < t_cut, server for t >= t_cut."""
    split = make_split(scheduler, t_cut)
    owners = [split.owner(t) for t in range(T)]
    assert owners == ["client"] * t_cut + ["server"] * (T - t_cut)


@pytest.mark.parametrize("t", [-1, T])
def test_owner_rejects_timesteps_outside_schedule(scheduler, t):
    """Timesteps live in [0, T)."""
    with pytest.raises(ValueError, match="timestep"):
        make_split(scheduler, 10).owner(t)


@pytest.mark.parametrize("t_cut", [1, 2, 100, T - 1, T])
def test_release_level_is_one_below_cut(scheduler, t_cut):
    """r = t_cut - 1 and abar_r is the schedule's value there."""
    split = make_split(scheduler, t_cut)
    assert split.release_level == t_cut - 1
    assert split.abar_release == pytest.approx(float(scheduler.alphas_cumprod[t_cut - 1]))


def test_global_model_releases_the_clean_latent(scheduler):
    """t_cut = 0 (GM): abar_r := 1, so z_r == z0 exactly: no privacy, as documented."""
    split = make_split(scheduler, 0)
    g = torch.Generator().manual_seed(0)
    z0, eps_c = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    assert split.is_global_model and not split.is_independent
    assert split.release_level == -1
    assert split.abar_release == 1.0
    assert torch.equal(split.release(z0, eps_c), z0)


@pytest.mark.parametrize("t_cut", [1, 100, T - 1])
def test_release_is_the_forward_process_at_release_level(scheduler, t_cut):
    """z_r = sqrt(abar_r) z0 + sqrt(1 - abar_r) eps_c."""
    split = make_split(scheduler, t_cut)
    g = torch.Generator().manual_seed(t_cut)
    z0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps_c = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    abar_r = split.alphas_cumprod[t_cut - 1]
    expected = abar_r.sqrt() * z0 + (1 - abar_r).sqrt() * eps_c
    torch.testing.assert_close(split.release(z0, eps_c), expected)
    assert not split.is_global_model and not split.is_independent


def test_independent_clients_release_nothing(scheduler):
    """t_cut = T (ICM): no server timesteps, and release refuses."""
    split = make_split(scheduler, T)
    assert split.is_independent
    with pytest.raises(ValueError, match="releases nothing"):
        split.release(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("handoff_t", [-1, T + 1, 10 * T])
def test_cut_outside_schedule_is_rejected(scheduler, handoff_t):
    """The hand-off must lie in [0, T]."""
    with pytest.raises(ValueError, match="handoff_t"):
        make_split(scheduler, handoff_t)


@pytest.mark.parametrize(
    "alphas_cumprod", [torch.ones(1), torch.ones(2, 3)], ids=["one_step", "two_dim"]
)
def test_malformed_schedule_is_rejected(alphas_cumprod):
    """The schedule is a 1-D tensor of at least two timesteps."""
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusionSplit(alphas_cumprod, 0)


def sampling_timesteps(scheduler_class: type, num_inference_steps: int) -> torch.Tensor:
    """One sampling chain, as a diffusers scheduler lays it out (descending)."""
    sampler = scheduler_class(num_train_timesteps=T)
    sampler.set_timesteps(num_inference_steps)
    return sampler.timesteps


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("num_inference_steps", [7, 50, T])
@pytest.mark.parametrize("t_cut", [0, 1, 100, 500, T - 1, T])
def test_split_timesteps_cuts_one_chain(scheduler, scheduler_class, num_inference_steps, t_cut):
    """Server part >= t_cut, client part < t_cut, and together exactly the original chain."""
    timesteps = sampling_timesteps(scheduler_class, num_inference_steps)
    server, client = make_split(scheduler, t_cut).split_timesteps(timesteps)
    assert torch.all(server >= t_cut)
    assert torch.all(client < t_cut)
    assert torch.equal(torch.cat([server, client]), timesteps)


@pytest.mark.parametrize(
    ("timesteps", "t_cut"),
    [
        ([0, 100, 200, 300], 150),  # ascending across the cut
        ([900, 50, 600, 10], 100),  # interleaved across the cut
        ([600, 900, 50, 10], 100),  # partition contiguous, server part ascending
        ([900, 800, 10, 50], 100),  # partition contiguous, client part ascending
        ([0, 1, 2], 0),  # global model: everything is the server's
    ],
)
def test_split_timesteps_rejects_non_descending_chain(scheduler, timesteps, t_cut):
    """A chain that is not in descending order is refused, not silently cut."""
    with pytest.raises(ValueError, match="descending"):
        make_split(scheduler, t_cut).split_timesteps(torch.tensor(timesteps))


def test_loss_weights_values():
    """none: 1; inverse_lambda2: 1/lam^2; inverse_lambda: 1/lam."""
    lam = torch.tensor([1.0, 1.5, 7.0, 40.0])
    assert torch.equal(loss_weights(lam, "none"), torch.ones(4))
    torch.testing.assert_close(loss_weights(lam, "inverse_lambda2"), 1 / lam**2)
    torch.testing.assert_close(loss_weights(lam, "inverse_lambda"), 1 / lam)


def test_loss_weights_reject_unknown_weighting():
    """Only the named weightings exist."""
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(torch.ones(2), "snr")


SMALL_T = 20
SERVER_CUTS = (0, 5, SMALL_T - 1)


def assert_uniform(values: torch.Tensor, low: int, high: int) -> None:
    """`values` take every integer in [low, high) and nothing else, each about equally often."""
    assert torch.equal(values.unique(), torch.arange(low, high))
    n, p = len(values), 1 / (high - low)
    counts = torch.bincount(values - low, minlength=high - low).double()
    assert torch.all((counts - n * p).abs() < Z_SCORE * (n * p * (1 - p)) ** 0.5 + 1e-9)


@pytest.mark.parametrize("cut_index", range(len(SERVER_CUTS)))
def test_server_timesteps_respect_each_samples_cut(cut_index):
    """s_i ~ U{t_cut_i .. T-1} in a batch of mixed cuts: never below its own cut, never >= T,
    and uniform over the allowed values."""
    per_cut = 2_000
    t_cut = torch.tensor(SERVER_CUTS).repeat_interleave(per_cut)
    s = sample_server_timesteps(t_cut, SMALL_T, torch.Generator().manual_seed(0))
    assert s.shape == t_cut.shape and s.dtype == torch.long
    assert torch.all(s >= t_cut) and torch.all(s < SMALL_T)
    assert_uniform(s[t_cut == SERVER_CUTS[cut_index]], SERVER_CUTS[cut_index], SMALL_T)


@pytest.mark.parametrize("cut_index", range(len(SERVER_CUTS)))
def test_rising_server_timesteps_follow_their_density_from_each_samples_cut(cut_index):
    """`rising`: P(s) = (2 (s - c) + 1) / (T - c)^2 over {c .. T-1} for each sample's own cut
    c, in a batch of mixed cuts; every count within Z_SCORE binomial deviations of it."""
    per_cut = 20_000
    t_cut = torch.tensor(SERVER_CUTS).repeat_interleave(per_cut)
    s = sample_server_timesteps(t_cut, SMALL_T, torch.Generator().manual_seed(0), "rising")
    assert torch.all(s >= t_cut) and torch.all(s < SMALL_T)
    c = SERVER_CUTS[cut_index]
    mine = s[t_cut == c]
    p = (2 * torch.arange(SMALL_T - c, dtype=torch.float64) + 1) / (SMALL_T - c) ** 2
    counts = torch.bincount(mine - c, minlength=SMALL_T - c).double()
    sd = (per_cut * p * (1 - p)).sqrt()
    assert torch.all((counts - per_cut * p).abs() < Z_SCORE * sd + 1e-9)
    if SMALL_T - c > 2:  # and so the top of the range is drawn more often than the bottom
        assert counts[-1] > counts[0]


def test_an_unknown_timestep_density_is_refused():
    with pytest.raises(ValueError, match="density must be one of"):
        sample_server_timesteps(torch.tensor([5]), SMALL_T, density="high")
    with pytest.raises(ValueError, match=r"split\.server_timesteps.*uniform.*rising"):
        SplitConfig(server_timesteps="high")


def test_server_timesteps_reject_independent_cut():
    """A sample whose client has hand-off T has no server timestep to draw."""
    with pytest.raises(ValueError, match="handoff_t = T"):
        sample_server_timesteps(torch.tensor([0, SMALL_T]), SMALL_T)


def test_server_timesteps_are_reproducible():
    """The same generator seed gives the same timesteps."""
    t_cut = torch.tensor(SERVER_CUTS).repeat(50)
    draws = [
        sample_server_timesteps(t_cut, SMALL_T, torch.Generator().manual_seed(3)) for _ in range(2)
    ]
    assert torch.equal(*draws)


@pytest.mark.parametrize("t_cut", [1, 2, 7, SMALL_T])
def test_client_timesteps_cover_below_cut(t_cut):
    """t ~ U{0 .. t_cut-1}: every client timestep, about equally often, and nothing else."""
    t = sample_client_timesteps(4_000, t_cut, torch.Generator().manual_seed(0))
    assert t.shape == (4_000,)
    assert_uniform(t, 0, t_cut)


def test_client_timesteps_reject_global_model():
    """A client with train_cut = 0 (a GM client) has no timesteps of its own."""
    with pytest.raises(ValueError, match="train_cut = 0"):
        sample_client_timesteps(4, 0)


# ---- the buffer (split.max_target_variance) ------------------------------------------------


def _lam2(abar, release_cut, s):
    return float((1 - abar[s]) / (1 - abar[s] / abar[release_cut - 1]))


@pytest.mark.parametrize("release_cut", [20, 100, 500])
def test_buffered_cut_is_the_first_timestep_with_bounded_target_variance(release_cut):
    from latentfuse.method.split import buffered_cut

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    handoff = buffered_cut(abar, release_cut, 4.0)
    assert handoff > release_cut
    assert _lam2(abar, release_cut, handoff) <= 4.0 < _lam2(abar, release_cut, handoff - 1)
    assert buffered_cut(abar, release_cut, 0.0) == release_cut
    assert buffered_cut(abar, 0, 4.0) == 0 and buffered_cut(abar, 1000, 4.0) == 1000
    with pytest.raises(ValueError, match="must be > 1"):
        buffered_cut(abar, release_cut, 0.5)


def test_a_buffered_split_releases_at_its_release_cut_and_stays_exact():
    """The release keeps the configured level; the server's z_s at s >= hand-off has the
    forward process's marginal given z0, and its target is lam_s eps_s with lam from r."""
    from latentfuse.method.split import buffered_cut

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    handoff = buffered_cut(abar, 100, 4.0)
    split = DiffusionSplit(abar, handoff, release_cut=100)
    assert split.release_level == 99 and split.abar_release == pytest.approx(float(abar[99]))
    assert split.owner(handoff - 1) == "client" and split.owner(handoff) == "server"
    g = torch.Generator().manual_seed(0)
    z0 = torch.full((20000, 1), 0.7)
    z_r = split.release(z0, torch.randn(z0.shape, generator=g))
    s = torch.full((20000,), handoff)
    z_s, target, lam = split.server_inputs(z_r, s, torch.randn(z0.shape, generator=g), "exact")
    abar_s = float(abar[handoff])
    assert z_s.mean().item() == pytest.approx(abar_s**0.5 * 0.7, abs=0.02)
    assert z_s.var().item() == pytest.approx(1 - abar_s, rel=0.05)
    assert lam[0].item() ** 2 == pytest.approx(_lam2(abar, 100, handoff), rel=1e-5)
    with pytest.raises(ValueError, match="release_cut must lie"):
        DiffusionSplit(abar, 100, release_cut=150)


def test_config_checks_max_target_variance():
    from latentfuse.config import load_config

    with pytest.raises(ValueError, match="split.max_target_variance"):
        load_config(None, ["split.max_target_variance=1.0"])
    with pytest.raises(ValueError, match="objective 'original'"):
        load_config(None, ["split.max_target_variance=4.0", 'split.objective="original"'])


def test_compensated_start_follows_the_authors_rule():
    """t' = floor(t_c (2 - t_c / T)): T = 100, t_c = 20 gives 36 (collafuse_imagen)."""
    from latentfuse.method.split import compensated_start

    assert compensated_start(20, 100) == 36
    assert compensated_start(100, 1000) == 190 and compensated_start(500, 1000) == 750
    assert compensated_start(0, 1000) == 0 and compensated_start(1000, 1000) == 1000


def test_split_timesteps_with_client_start_reruns_the_levels_below_it():
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    chain = torch.arange(960, -1, -40)
    server, client = DiffusionSplit(abar, 100).split_timesteps(chain, client_start=190)
    assert server.min() >= 100 and server[-1] == 120
    assert client.tolist() == [160, 120, 80, 40, 0]
    plain = DiffusionSplit(abar, 100).split_timesteps(chain)[1]
    assert plain.tolist() == [80, 40, 0]
    with pytest.raises(ValueError, match="client_start must be"):
        DiffusionSplit(abar, 100).split_timesteps(chain, client_start=50)


def test_restart_client_chain_points_a_stateful_scheduler_at_the_clients_entry():
    from diffusers import EulerDiscreteScheduler

    from latentfuse.pipelines.sampling import restart_client_chain

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    abar = scheduler.alphas_cumprod.double()
    server, client = DiffusionSplit(abar, 300).split_timesteps(
        scheduler.timesteps, client_start=510
    )
    latents = torch.zeros(1, 1, 2, 2)
    for t in server:  # the server's part advances the step index past the cut
        latents = scheduler.step(torch.zeros_like(latents), t, latents).prev_sample
    restart_client_chain(scheduler, server, client)
    scheduler.step(torch.zeros_like(latents), client[0], latents)
    first = int((scheduler.timesteps > client[0]).sum())
    assert client[0] > server[-1] and scheduler.step_index == first + 1


@pytest.mark.parametrize(
    ("objective", "entry", "t_cut", "start", "train_cut"),
    [
        ("exact", "auto", 100, None, 100),  # as before: the hand-off
        ("original", "auto", 100, 190, 100),  # as before: shifted start, trained below the cut
        ("original", "cut", 100, None, 100),
        ("exact", "compensated", 100, 190, 190),  # trained on every level it runs
        ("original", "compensated", 200, 360, 360),
        ("exact", "compensated", 0, None, 0),  # GM: no hand-off to shift
        ("original", "compensated", 1000, None, 1000),  # ICM
    ],
)
def test_client_entry_sets_where_the_client_starts_and_what_it_trains_on(
    scheduler, objective, entry, t_cut, start, train_cut
):
    split = DiffusionSplit.from_scheduler(scheduler, t_cut)
    assert client_start(split, objective, entry) == start
    assert client_train_cut(split, objective, entry) == train_cut


def test_an_unknown_client_entry_is_refused(scheduler):
    split = DiffusionSplit.from_scheduler(scheduler, 100)
    with pytest.raises(ValueError, match="client_entry"):
        client_start(split, "exact", "above")
    with pytest.raises(ValueError, match="split.client_entry"):
        SplitConfig(client_entry="above")
