"""The one place that owns the cut point: who owns each timestep, the release, the server's
noising and target (method.md §2), and how a sampling chain is split.

Notation as in diffusers' DDPMScheduler: timesteps t = 0..T-1,
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps. Two levels, named apart:

- the release cut `release_cut` (the config's `split.t_cut`): releases are at level
  r = release_cut - 1 (abar_r := 1 when release_cut = 0);
- the hand-off `handoff_t`: client timesteps are 0..handoff_t-1, server ones handoff_t..T-1.

They are equal unless a buffer (`split.max_target_variance`, `buffered_cut`) raises the
hand-off to where the server's target variance lam_s^2 is bounded; the client covers the gap.
The files keep their keys: "t_cut" is the hand-off in collafuse.json, the wire and the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Objective = Literal["exact", "original"]
Weighting = Literal["none", "inverse_lambda2", "inverse_lambda"]
OBJECTIVES = ("exact", "original")
WEIGHTINGS = ("none", "inverse_lambda2", "inverse_lambda")
# how the server draws s in [handoff_t, T): "uniform", or "rising": P(s) proportional to
# 2 (s - handoff_t) + 1, so the top fifth of the range gets ~2x its uniform share (the highest-noise
# steps decide class and layout: README, "Does it work on a new data set?")
TIMESTEP_DENSITIES = ("uniform", "rising")
# where sampling starts the client: "cut" (at the hand-off, the chain simply continues),
# "compensated" (the authors' shifted start `compensated_start`; the client then trains on
# every level it runs), "auto" (as before 0.2: compensated under the original objective with
# the client trained below the cut only, the hand-off under the exact one)
CLIENT_ENTRIES = ("auto", "cut", "compensated")


@dataclass(frozen=True)
class DiffusionSplit:
    """A split of a T-step forward process (cumulative products `alphas_cumprod`): the client
    owns timesteps 0..handoff_t-1 and releases at level release_cut - 1; the server owns
    handoff_t..T-1. The configured cut `split.t_cut` is the release cut; the hand-off equals it
    unless the server's buffer raises it (`buffered_cut`)."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    handoff_t: int  # the hand-off: client timesteps 0..handoff_t-1, server handoff_t..T-1
    release_cut: int | None = None  # releases at level release_cut - 1; None: handoff_t

    def __post_init__(self) -> None:
        if self.alphas_cumprod.ndim != 1 or len(self.alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 timesteps")
        if not 0 <= self.handoff_t <= self.num_train_timesteps:
            raise ValueError(
                f"handoff_t must lie in [0, {self.num_train_timesteps}], got {self.handoff_t}"
            )
        if self.release_cut is None:
            object.__setattr__(self, "release_cut", self.handoff_t)
        if not 0 <= self.release_cut <= self.handoff_t:
            raise ValueError(
                f"release_cut must lie in [0, handoff_t={self.handoff_t}], got {self.release_cut}"
            )
        if self.release_cut == 0 and self.handoff_t > 0:
            raise ValueError("a buffer needs release_cut > 0: clean releases (GM) need none")

    @classmethod
    def from_scheduler(cls, scheduler, handoff_t: int) -> DiffusionSplit:
        """The split of a diffusers scheduler's training noise schedule (no buffer)."""
        return cls(scheduler.alphas_cumprod.detach().to(torch.float64).clone(), int(handoff_t))

    @property
    def num_train_timesteps(self) -> int:
        """T."""
        return len(self.alphas_cumprod)

    @property
    def is_global_model(self) -> bool:
        """handoff_t = 0: the server does everything (GM); clients release clean latents."""
        return self.handoff_t == 0

    @property
    def is_independent(self) -> bool:
        """handoff_t = T: no server timesteps (ICM); nothing is released."""
        return self.handoff_t == self.num_train_timesteps

    @property
    def release_level(self) -> int:
        """r = release_cut - 1 (handoff_t - 1 without a buffer); -1: the clean latent."""
        return self.release_cut - 1

    @property
    def abar_release(self) -> float:
        """abar_r, with abar_{-1} := 1."""
        return 1.0 if self.release_cut == 0 else float(self.alphas_cumprod[self.release_cut - 1])

    def owner(self, t: int) -> Literal["client", "server"]:
        """Which side denoises timestep `t`."""
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.num_train_timesteps}), got {t}")
        return "client" if t < self.handoff_t else "server"

    def release(self, z0: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
        """z_r = sqrt(abar_r) z0 + sqrt(1 - abar_r) eps_c: all a client ever sends."""
        if self.is_independent:
            raise ValueError("handoff_t = T (independent client models) releases nothing")
        abar_r = self.abar_release
        return (abar_r**0.5) * z0 + ((1 - abar_r) ** 0.5) * eps_c

    def release_bounds(self, dim: int, max_abs: float, max_norm: float = 0.0) -> dict[str, float]:
        """What a release of this level can hold when z0 (dim elements) has elements within
        +-`max_abs` and norm <= `max_norm` (0: max_abs sqrt(dim)): z_r = sqrt(abar_r) z0 +
        sqrt(1 - abar_r) eps. With eps ~ N(0, I): |eps_i| <= 7 and | ||eps|| - sqrt(dim) | <= 7
        (||eps|| - sqrt(dim) has std ~0.71), so a false refusal has odds below 1e-11 per element.
        Returns the per-element bound and the norm's interval."""
        abar = self.abar_release
        signal, noise = abar**0.5, (1 - abar) ** 0.5
        z0_norm = min(max_norm, max_abs * dim**0.5) if max_norm > 0 else max_abs * dim**0.5
        return {
            "max_abs": signal * max_abs + noise * 7.0,
            "min_norm": max(0.0, noise * (dim**0.5 - 7.0) - signal * z0_norm),
            "max_norm": signal * z0_norm + noise * (dim**0.5 + 7.0),
            "min_spread": self.min_spread(dim),
        }

    def min_spread(self, dim: int) -> float:
        """The least norm of a release's `dim` elements around their own mean, whatever z0:
        with P the centring, ||P z_r||^2 = s^2 a^2 + n^2 ||P eps||^2 + 2 s n <P z0, P eps>
        (a = ||P z0||, s^2 = abar_r, n^2 = 1 - abar_r). eps is drawn apart from z0, so the cross
        term is N(0, a^2 s^2 n^2 4) and above -14 s n a but with odds < 1e-11; the least of
        s^2 a^2 - 14 s n a over a is -49 n^2; ||P eps||^2 is chi^2 with dim - 1 degrees, above
        dim - 1 - 7 sqrt(2 (dim - 1)) alike. So ||P z_r|| >= n sqrt(dim - 1 - 7 sqrt(2 (dim - 1))
        - 49): the noise's own spread, which no honest release lacks. A constant or all-zero
        latent has none."""
        noise = (1 - self.abar_release) ** 0.5
        floor = (dim - 1) - 7.0 * (2 * (dim - 1)) ** 0.5 - 49.0
        return noise * max(0.0, floor) ** 0.5

    @property
    def crowding_width(self) -> float:
        """The width of the intervals `most_in_width` counts in: half the level's noise std."""
        return 0.5 * (1 - self.abar_release) ** 0.5

    def most_in_width(self, dim: int, spacing: float = 0.0) -> int:
        """The most of a release's `dim` elements that one interval of width `crowding_width`
        holds, whatever z0: each element is sqrt(abar_r) z0_i + n eps_i with eps_i ~ N(0, 1)
        drawn apart from z0, so it lands in an interval of width w with probability at most
        w / (n sqrt(2 pi)) (the Gaussian's largest density) = 0.2, independently of the other
        elements. The count is then below a Binomial(dim, p) one, and the Chernoff bound
        P(X >= k) <= exp(-dim KL(k/dim || p)) at odds 1e-11 / dim (for every occupied interval
        at once) gives the limit. `spacing`: a rounding of the elements (float16 on the wire)
        widens the interval by one spacing. A latent that is zero, constant or flat on most of
        its elements (58 spikes on zeros) crowds one interval and is refused at every cut;
        dim (never refused) for clean releases."""
        noise = (1 - self.abar_release) ** 0.5
        if noise == 0.0:
            return dim
        p = min(1.0, (self.crowding_width + spacing) / (noise * (2 * math.pi) ** 0.5))
        if p >= 1.0:
            return dim
        budget = math.log(dim / 1e-11)
        for k in range(math.ceil(p * dim), dim + 1):
            q = k / dim
            divergence = q * math.log(q / p) + (
                (1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else -math.log(1 - p)
            )
            if dim * divergence >= budget:
                return k
        return dim

    def _abar(self, s: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(s.device)[s]

    def server_inputs(
        self, z_r: torch.Tensor, s: torch.Tensor, eps_s: torch.Tensor, objective: Objective
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_s, target, lam_s) for server timesteps `s` (b,) from releases `z_r` (b, c, h, w)."""
        if torch.any(s < self.handoff_t):
            raise ValueError(f"server timesteps must be >= handoff_t={self.handoff_t}")
        # The coefficients in float64 where the schedule lives (1 - a is small near the cut);
        # the tensor arithmetic in the latents' own dtype and device (float32 on the GPU).
        abar_s = self.alphas_cumprod[s.cpu()]
        shape = (-1,) + (1,) * (z_r.ndim - 1)
        if objective == "exact":
            # method.md §2: a = abar_s / abar_r; z_s = sqrt(a) z_r + sqrt(1-a) eps_s has marginal
            # q(z_s | z0); E[eps | z_s] minimises ||eps_theta - lam_s eps_s||^2.
            a = abar_s / self.abar_release
            lam = ((1 - abar_s) / (1 - a)).sqrt()
        elif objective == "original":
            # The authors' baseline: noise the release again as if it were clean data.
            a, lam = abar_s, torch.ones_like(abar_s)
        else:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        dtype = torch.float64 if z_r.dtype == torch.float64 else torch.float32

        def coefficient(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=z_r.device, dtype=dtype).view(shape)

        z_s = coefficient(a.sqrt()) * z_r.to(dtype) + coefficient((1 - a).sqrt()) * eps_s.to(dtype)
        target = coefficient(lam) * eps_s.to(dtype)
        lam = lam.to(device=z_r.device, dtype=dtype)
        return z_s.to(z_r.dtype), target.to(z_r.dtype), lam.to(z_r.dtype)

    def split_timesteps(
        self, timesteps: torch.Tensor, client_start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split one sampling chain (descending timesteps) into the server's and client's parts.

        The list is cut, never re-scheduled: `set_timesteps(timesteps=full[:k])` would send
        the last server step to t = -1 (method.md §2, Sampling). With `client_start` t' (the
        original objective's compensation, `compensated_start`) the client's part is the
        chain's entries below t' instead: it takes the server's output for a sample at its
        first entry and re-runs the levels between the cut and t'.
        """
        # Non-increasing (repeats allowed, as in Heun); this also makes the cut contiguous.
        if torch.any(timesteps[1:] > timesteps[:-1]):
            raise ValueError("timesteps must be in descending order")
        k = int((timesteps >= self.handoff_t).sum())
        if client_start is None or self.is_global_model or self.is_independent:
            return timesteps[:k], timesteps[k:]
        if client_start < self.handoff_t:
            raise ValueError(
                f"client_start must be >= handoff_t={self.handoff_t}, got {client_start}"
            )
        return timesteps[:k], timesteps[timesteps < client_start]


def compensated_start(handoff_t: int, num_train_timesteps: int) -> int:
    """Where the authors' code starts the client under the original objective: the server's
    output at the cut is taken for a sample at t' = floor(handoff_t (2 - handoff_t / T)), the
    client denoising t' - 1 .. 0 (SimeonAllmendinger/collafuse_imagen, diffusion.py
    generate_images: t_max = handoff_t + handoff_t (1 - t_cut_ratio)). It compensates the double
    noising of their server objective; a heuristic, not derived from abar."""
    if not 0 <= handoff_t <= num_train_timesteps:
        raise ValueError(f"handoff_t must lie in [0, {num_train_timesteps}], got {handoff_t}")
    return min(int(handoff_t * (2 - handoff_t / num_train_timesteps)), num_train_timesteps)


def client_start(split: DiffusionSplit, objective: str, client_entry: str = "auto") -> int | None:
    """The level sampling starts the client at (`split_timesteps(client_start=...)`); None: at
    the hand-off. GM and ICM have no hand-off to shift."""
    if client_entry not in CLIENT_ENTRIES:
        raise ValueError(f"client_entry must be one of {CLIENT_ENTRIES}, got {client_entry!r}")
    if split.is_global_model or split.is_independent or client_entry == "cut":
        return None
    if client_entry == "compensated" or objective == "original":
        return compensated_start(split.handoff_t, split.num_train_timesteps)
    return None


def client_train_cut(split: DiffusionSplit, objective: str, client_entry: str = "auto") -> int:
    """The client trains on t < this: the hand-off, or under "compensated" every level it runs
    at sampling (t < client_start), so no step uses a timestep the client never saw."""
    start = client_start(split, objective, client_entry)
    return start if client_entry == "compensated" and start is not None else split.handoff_t


def buffered_cut(alphas_cumprod: torch.Tensor, release_cut: int, max_target_variance: float) -> int:
    """The hand-off above a release at `release_cut` - 1 where the exact objective's target
    variance is bounded: the smallest s >= release_cut with lam_s^2 <= max_target_variance
    (Daras et al.'s buffer, s_max about 4). lam_s^2 = (1 - abar_s) / (1 - abar_s / abar_r)
    falls from infinity at the release level towards 1 at T, so every bound > 1 is met."""
    T = len(alphas_cumprod)
    if not max_target_variance or release_cut in (0, T):
        return release_cut  # no buffer; GM's clean releases have lam = 1; ICM releases nothing
    if max_target_variance <= 1:
        raise ValueError(f"max_target_variance must be > 1 (or 0: none), got {max_target_variance}")
    abar = alphas_cumprod.double()
    abar_r = float(abar[release_cut - 1])
    s = torch.arange(release_cut, T)
    lam2 = (1 - abar[s]) / (1 - abar[s] / abar_r)
    ok = torch.nonzero(lam2 <= max_target_variance)
    return int(s[ok[0, 0]]) if len(ok) else T - 1


def loss_weights(lam: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """Per-sample weights w_s of the server loss; none changes the minimiser (method.md §2)."""
    if weighting == "none":
        return torch.ones_like(lam)
    if weighting == "inverse_lambda2":
        return 1.0 / lam.pow(2)
    if weighting == "inverse_lambda":
        return 1.0 / lam
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def sample_server_timesteps(
    handoff_t: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    density: str = "uniform",
) -> torch.Tensor:
    """s in {handoff_t_i .. T-1} per sample, for per-client cuts `handoff_t` (b,): uniform, or
    ("rising") with P(s) proportional to 2 (s - handoff_t_i) + 1, the floor of a continuous
    density rising linearly from the cut (inverse CDF: handoff_t + (T - handoff_t) sqrt(u)). Either
    leaves the server's minimiser at each s unchanged; it sets how much of the training each
    s gets."""
    if torch.any(handoff_t >= num_train_timesteps):
        raise ValueError("a client with handoff_t = T has no server timesteps")
    if density not in TIMESTEP_DENSITIES:
        raise ValueError(f"density must be one of {TIMESTEP_DENSITIES}, got {density!r}")
    u = torch.rand(handoff_t.shape, generator=generator, dtype=torch.float64)
    if density == "rising":
        u = u.sqrt()
    span = (num_train_timesteps - handoff_t).double()
    return (handoff_t + (u * span).floor().long()).clamp(max=num_train_timesteps - 1)


def sample_client_timesteps(
    batch_size: int, train_cut: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t ~ U{0 .. train_cut-1}."""
    if train_cut < 1:
        raise ValueError("a client with train_cut = 0 has no timesteps of its own")
    return torch.randint(0, train_cut, (batch_size,), generator=generator)
