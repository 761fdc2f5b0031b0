"""The run's noise schedule and each client's cut: role-neutral, the same answer on both sides.

The client (what it trains and where it releases) and the server (what it accepts and where
its range starts) both ask here, so neither needs the other's code.
"""

from __future__ import annotations

import logging

import torch
from diffusers import DDPMScheduler

from latentfuse.config import RunConfig
from latentfuse.method.privacy import private_t_cut
from latentfuse.method.split import DiffusionSplit, buffered_cut

logger = logging.getLogger(__name__)


def make_scheduler(config: RunConfig) -> DDPMScheduler:
    """The training noise schedule every split and the pipeline share."""
    return DDPMScheduler(
        num_train_timesteps=config.split.num_train_timesteps,
        beta_schedule=config.split.beta_schedule,
        clip_sample=False,
    )


def client_split(config: RunConfig, scheduler: DDPMScheduler, client_id: int) -> DiffusionSplit:
    """One client's cut: its configured cut, raised to the smallest private one when
    `privacy.target_epsilon` is set (the same answer on the client and the server side)."""
    t_cut, privacy = config.client_t_cut(client_id), config.privacy
    if privacy.target_epsilon > 0:
        needed = private_t_cut(
            scheduler.alphas_cumprod.double(),
            privacy.clip_norm,
            privacy.target_epsilon,
            privacy.delta,
            config.split.release_policy,
            privacy.max_releases,
        )
        if needed > t_cut:
            logger.info(
                "client %d: t_cut %d -> %d for (epsilon=%g, delta=%g) at clip norm %g",
                client_id,
                t_cut,
                needed,
                privacy.target_epsilon,
                privacy.delta,
                privacy.clip_norm,
            )
            t_cut = needed
    alphas = scheduler.alphas_cumprod.detach().to(torch.float64).clone()
    handoff = buffered_cut(alphas, t_cut, config.split.max_target_variance)
    return DiffusionSplit(alphas, handoff, release_cut=t_cut)
