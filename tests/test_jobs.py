"""Building a run's denoisers (latentfuse/training/jobs.py): one factory, one seed rule."""

from __future__ import annotations

import pytest
import torch

from latentfuse.config import load_config
from latentfuse.training.jobs import (
    DenoiserSpec,
    client_denoiser,
    client_seed,
    server_denoiser,
    server_embeddings,
    server_seed,
)


def config(*overrides: str):
    base = ["server_unet.block_out_channels=[32]", "client_unet.block_out_channels=[32]"]
    return load_config(None, [*base, *overrides])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_same_config_builds_the_same_initial_weights_and_clients_differ():
    cfg, spec = config("train.seed=3"), DenoiserSpec("class", 4)
    assert same_weights(client_denoiser(cfg, 0, spec, 8, 4), client_denoiser(cfg, 0, spec, 8, 4))
    assert not same_weights(
        client_denoiser(cfg, 0, spec, 8, 4), client_denoiser(cfg, 1, spec, 8, 4)
    )
    assert same_weights(server_denoiser(cfg, spec, 8, 4), server_denoiser(cfg, spec, 8, 4))
    seeds = {server_seed(cfg), *(client_seed(cfg, c) for c in range(5))}
    assert len(seeds) == 6  # the server and every client start from their own seed


@pytest.mark.parametrize(
    ("labels", "kind", "embeds"),
    [("class", "attributes", 5), ("client", "class", 4), ("none", "class", None)],
)
def test_the_server_sees_what_server_labels_says(labels, kind, embeds):
    cfg = config(f'server_labels="{labels}"', "data.num_clients=3")
    spec = DenoiserSpec("attributes", 4, num_attributes=6)
    assert server_embeddings(cfg, spec) == (kind, embeds)
    unet = server_denoiser(cfg, spec, 8, 4)
    if kind == "class":
        assert unet.config.num_class_embeds == embeds
    else:
        assert unet.config.projection_class_embeddings_input_dim == 6


def test_a_bad_spec_is_refused():
    with pytest.raises(ValueError, match="kind"):
        DenoiserSpec("pixels", 3)
