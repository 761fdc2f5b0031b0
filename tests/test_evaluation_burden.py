"""Client burden: FLOPs and time per image on each side, and bytes each way."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from latentfuse.evaluation import client_burden, count_flops

LATENT_SHAPE = (4, 8, 8)


def tiny_unet(channels: int, classes: int | None = 5) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=LATENT_SHAPE[1],
        in_channels=LATENT_SHAPE[0],
        out_channels=LATENT_SHAPE[0],
        block_out_channels=(channels,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=classes,
    )


@pytest.fixture(scope="module")
def parts() -> dict:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=LATENT_SHAPE[0],
        norm_num_groups=4,
        sample_size=16,
        layers_per_block=1,
        mid_block_add_attention=False,
    ).eval()
    return {
        "client": tiny_unet(8),
        "server": tiny_unet(16),
        "vae": vae,
        "scheduler": DDPMScheduler(num_train_timesteps=1000),
    }


def burden(parts: dict, t_cut: int, steps: int = 10, **kwargs) -> dict:
    client = parts["client"] if t_cut > 0 else None
    server = parts["server"] if t_cut < 1000 else None
    return client_burden(
        client, server, parts["vae"], parts["scheduler"], t_cut, steps, measure_time=False, **kwargs
    )


def test_global_model_leaves_the_client_only_the_decoder(parts):
    report = burden(parts, 0)
    sampling = report["sampling"]
    assert sampling["client_steps"] == 0 and sampling["server_steps"] == 10
    assert sampling["client_step_share"] == 0
    assert sampling["client_flops_per_image"] == sampling["decoder_flops_per_image"] > 0
    assert 0 < sampling["client_share"] < 1
    assert report["training"]["client_share"] == 0


def test_independent_clients_do_everything(parts):
    report = burden(parts, 1000)
    assert report["sampling"]["client_share"] == 1 and report["sampling"]["server_steps"] == 0
    assert report["training"]["client_share"] == 1
    assert report["bytes_per_image"]["training_upload_per_release"] == 0
    assert report["bytes_per_image"]["sampling_download"] == 0


@pytest.mark.parametrize("t_cut", [0, 300, 1000])
def test_flops_scale_with_steps(parts, t_cut):
    few, many = (
        burden(parts, t_cut, steps=5)["sampling"],
        burden(parts, t_cut, steps=20)["sampling"],
    )
    keys = {"client": "client_step_flops_per_image", "server": "server_flops_per_image"}
    for side, key in keys.items():
        if few[f"{side}_steps"]:
            per_step = few[key] / few[f"{side}_steps"]
            assert many[key] == pytest.approx(many[f"{side}_steps"] * per_step)
            assert many[f"{side}_steps"] > few[f"{side}_steps"]
        else:
            assert few[key] == 0
    assert many["decoder_flops_per_image"] == few["decoder_flops_per_image"]


def test_steps_split_as_the_pipeline_splits_them(parts):
    report = burden(parts, 300, steps=10)  # DDPM with 10 steps: 900, 800, ..., 0
    assert report["sampling"]["server_steps"] == 7 and report["sampling"]["client_steps"] == 3


def test_training_counts_forward_and_backward(parts):
    report = burden(parts, 300)
    inputs = {
        "sample": torch.randn(1, *LATENT_SHAPE),
        "timestep": torch.zeros(1, dtype=torch.long),
        "class_labels": torch.zeros(1, dtype=torch.long),
    }
    with torch.no_grad():
        forward = count_flops(lambda: parts["client"](**inputs))
    # Backward costs about twice the forward: input and weight gradients.
    assert 2.5 * forward < report["training"]["client_flops_per_image"] < 3.5 * forward


@pytest.mark.parametrize("bytes_per_element", [4, 2])
def test_bytes_are_latent_numel_times_element_size(parts, bytes_per_element):
    report = burden(parts, 300, bytes_per_element=bytes_per_element)
    numel = LATENT_SHAPE[0] * LATENT_SHAPE[1] * LATENT_SHAPE[2]
    wire = report["bytes_per_image"]
    assert wire["training_upload_per_release"] == numel * bytes_per_element
    assert wire["sampling_download"] == numel * bytes_per_element
    assert wire["training_download"] == 0


def test_wall_time_is_measured_per_image(parts):
    report = client_burden(
        parts["client"], parts["server"], parts["vae"], parts["scheduler"], 300, 4
    )
    for phase in ("training", "sampling"):
        assert report[phase]["client_seconds_per_image"] > 0
        assert report[phase]["server_seconds_per_image"] > 0


def test_missing_denoiser_is_named(parts):
    with pytest.raises(ValueError, match="client_unet"):
        client_burden(None, parts["server"], parts["vae"], parts["scheduler"], 300)
