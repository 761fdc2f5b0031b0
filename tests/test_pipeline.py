"""CollaFusePipeline: split sampling equals one diffusers chain; the call API (tiny models, CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from latentfuse import CollaFusePipeline

T = 1000
CLASS_NAMES = ("cat", "dog", "frog", "ship")
CLIENT_CLASSES = {0: [0, 1], 1: [2, 3]}
NULL_LABEL = len(CLASS_NAMES)
STEPS = 8
SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def tiny_unet(seed: int) -> UNet2DModel:
    """A class-conditional UNet over 4x8x8 latents (the last class embedding is the null label)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=8,
        num_class_embeds=len(CLASS_NAMES) + 1,
        add_attention=False,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """An autoencoder without downsampling: 4x8x8 latents <-> 3x8x8 images."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8,
        layers_per_block=1,
        mid_block_add_attention=False,
    ).eval()


def description(t_cut: int) -> dict[str, Any]:
    """A collafuse.json for two clients with one cut."""
    clients = {
        str(cid): {
            "t_cut": t_cut,
            "classes": classes,
            "class_names": [CLASS_NAMES[c] for c in classes],
        }
        for cid, classes in CLIENT_CLASSES.items()
    }
    return {
        "format": 1,
        "class_names": list(CLASS_NAMES),
        "clients": clients,
        "server_labels": "class",
        "num_train_timesteps": T,
        "data": {"source": "tiny", "partition": "classes", "num_clients": 2},
        "vae_sha256": "0" * 64,
    }


def tiny_pipeline(
    t_cut: int,
    scheduler: str = "ddpm",
    server_unet: UNet2DModel | None = None,
    client_unets: dict[int, UNet2DModel] | None = None,
) -> CollaFusePipeline:
    """A pipeline with the given denoisers (by default one UNet as server and both clients)."""
    shared = tiny_unet(0)
    server = (server_unet or shared) if t_cut < T else None
    clients = (client_unets or dict.fromkeys(CLIENT_CLASSES, shared)) if t_cut > 0 else {}
    pipe = CollaFusePipeline(
        tiny_vae(), DDPMScheduler(num_train_timesteps=T, clip_sample=False), server, clients
    )
    pipe.collafuse_config = description(t_cut)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_chain(
    scheduler, pick_unet, labels: torch.Tensor, seed: int, guidance_scale: float = 1.0
) -> torch.Tensor:
    """The plain diffusers loop over one scheduler; `pick_unet(t)` is the denoiser at step t."""
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((len(labels), 4, 8, 8), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        unet = pick_unet(t)
        noise = unet(model_input, t, class_labels=labels).sample
        if guidance_scale != 1.0:
            null = unet(model_input, t, class_labels=torch.full_like(labels, NULL_LABEL)).sample
            noise = null + guidance_scale * (noise - null)
        latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    return latents


def fresh(scheduler):
    """A new scheduler of the same configuration (a chain of its own)."""
    return type(scheduler).from_config(scheduler.config)


@pytest.mark.parametrize("t_cut", [0, 1, 300, 500, T], ids=lambda t: f"t_cut={t}")
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_split_chain_equals_one_chain(scheduler, t_cut):
    pipe = tiny_pipeline(t_cut, scheduler)
    labels = torch.tensor([2, 3, 2])
    unet = pipe.server_unet or pipe.client_unets[1]
    expected = reference_chain(fresh(pipe.scheduler), lambda t: unet, labels, seed=7)
    got = pipe(
        client_id=1,
        class_labels=labels,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_euler_timesteps_are_fractional():
    pipe = tiny_pipeline(500, "euler")
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps
    assert timesteps.is_floating_point() and torch.any(timesteps != timesteps.round())


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_server_runs_high_noise_steps_client_the_rest(scheduler):
    server, client = tiny_unet(1), tiny_unet(2)
    pipe = tiny_pipeline(500, scheduler, server, {0: client, 1: client})
    labels = torch.tensor([0, 1])
    by_cut = reference_chain(
        fresh(pipe.scheduler), lambda t: server if t >= 500 else client, labels, seed=3
    )
    server_only = reference_chain(fresh(pipe.scheduler), lambda t: server, labels, seed=3)
    got = pipe(
        client_id=0,
        class_labels=labels,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    torch.testing.assert_close(got, by_cut, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, server_only, rtol=1e-3, atol=1e-3)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per image."""
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_image_independent_of_batch_size(scheduler):
    pipe = tiny_pipeline(500, scheduler)
    global_state = torch.get_rng_state()
    call = dict(client_id=1, num_inference_steps=STEPS, output_type="pt")
    four = pipe(generator=generators([10, 11, 12, 13]), **call).images
    two = pipe(generator=generators([10, 11]), **call).images
    assert torch.equal(torch.get_rng_state(), global_state), "the global RNG was used"
    torch.testing.assert_close(four[:2], two, rtol=1e-4, atol=1e-5)


def drawn_labels(pipe: CollaFusePipeline, seeds: list[int]) -> list[int]:
    """The labels that `class_labels=None` draws for client 1 with generators of `seeds`."""
    from latentfuse.pipelines.sampling import client_labels

    return client_labels(pipe.collafuse_config, 1, None, len(seeds), generators(seeds)).tolist()


def test_drawn_labels_leave_the_image_streams_alone():
    pipe = tiny_pipeline(500, "ddpm")
    seeds = list(range(20, 28))
    labels = drawn_labels(pipe, seeds)
    assert set(labels) == set(CLIENT_CLASSES[1]), "labels come from the client's set, both seen"
    assert labels[:3] == drawn_labels(pipe, seeds[:3])
    # Drawing labels consumed nothing of the image streams: the drawn labels, passed
    # explicitly, give the same images.
    call = dict(client_id=1, num_inference_steps=STEPS, output_type="latent")
    drawn = pipe(generator=generators(seeds[:3]), **call).images
    explicit = pipe(generator=generators(seeds[:3]), class_labels=labels[:3], **call).images
    torch.testing.assert_close(drawn, explicit, rtol=0, atol=0)
    one = pipe(generator=torch.Generator().manual_seed(5), batch_size=3, **call).images
    assert one.shape == drawn.shape


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_classifier_free_guidance(scheduler):
    server, client = tiny_unet(1), tiny_unet(2)
    pipe = tiny_pipeline(500, scheduler, server, {0: client, 1: client})
    labels = torch.tensor([0, 1])
    pick = lambda t: server if t >= 500 else client
    call = dict(client_id=0, class_labels=labels, num_inference_steps=STEPS, output_type="latent")

    def sample(scale: float) -> torch.Tensor:
        return pipe(guidance_scale=scale, generator=torch.Generator().manual_seed(4), **call).images

    unguided = reference_chain(fresh(pipe.scheduler), pick, labels, seed=4)
    null_only = reference_chain(fresh(pipe.scheduler), pick, torch.full_like(labels, 4), seed=4)
    guided = reference_chain(fresh(pipe.scheduler), pick, labels, seed=4, guidance_scale=3.0)
    torch.testing.assert_close(sample(1.0), unguided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample(0.0), null_only, rtol=1e-4, atol=1e-4)
    # guidance x3 through a multistep solver amplifies the last-bit difference between the
    # pipeline's one batched (cond, uncond) call and the reference's two calls
    torch.testing.assert_close(sample(3.0), guided, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(sample(3.0), unguided, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_id": 7}, "client_id"),
        ({"class_labels": [3]}, "class_labels"),
        ({"class_labels": [0, 5]}, "class_labels"),
        ({"class_labels": [0.5]}, "class_labels"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"class_labels": [0, 1, 0], "batch_size": 2}, "class_labels"),
        ({"class_labels": [], "batch_size": 2}, "class_labels"),
        ({"generator": [torch.Generator()] * 3, "batch_size": 2}, "generator"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    pipe = tiny_pipeline(500)
    with pytest.raises(ValueError, match=message):
        pipe(**{"client_id": 0, "num_inference_steps": 2, **kwargs})


def test_missing_denoiser_is_an_error():
    pipe = tiny_pipeline(500)
    pipe.client_unets.pop(1)
    with pytest.raises(ValueError, match="client denoiser"):
        pipe(client_id=1, num_inference_steps=2)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(output_type):
    pipe = tiny_pipeline(500)
    out = pipe(batch_size=2, num_inference_steps=2, output_type=output_type)
    images = out.images
    if output_type == "pil":
        assert len(images) == 2 and all(isinstance(x, Image.Image) for x in images)
        assert images[0].size == (8, 8)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, 8, 8, 3)
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    else:
        assert images.shape == (2, 4, 8, 8)
    assert out.server_latents is None and "server_latents" not in out


@pytest.mark.parametrize("t_cut", [0, 500, T])
def test_server_latents_are_the_cut(t_cut):
    pipe = tiny_pipeline(t_cut, "euler")
    call = dict(client_id=0, batch_size=2, num_inference_steps=STEPS, return_server_latents=True)
    images, latents, decoded = pipe(
        generator=torch.Generator().manual_seed(1), output_type="pt", return_dict=False, **call
    )
    final = pipe(generator=torch.Generator().manual_seed(1), output_type="latent", **call).images
    assert decoded.shape == images.shape == (2, 3, 8, 8)
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    if t_cut == 0:
        torch.testing.assert_close(latents, final)
    elif t_cut == T:
        torch.testing.assert_close(latents, noise * pipe.scheduler.init_noise_sigma)
    else:
        assert not torch.allclose(latents, final) and not torch.allclose(latents, noise)
