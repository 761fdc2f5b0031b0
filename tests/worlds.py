"""A tiny world shared by the tests that train: noise images in 4 classes and a tiny VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentfuse.config import RunConfig, load_config

IMAGES_PER_CLASS = 12


def make_tiny_world(root: Path) -> dict[str, Path]:
    """Write a 4-class ImageFolder of 32x32 images and a tiny random AutoencoderKL under root."""
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = root / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        layers_per_block=1,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(root / "vae")
    return {"images": root / "images", "vae": root / "vae", "cache": root / "cache"}


def tiny_config(world: dict[str, Path], *overrides: str) -> RunConfig:
    """A 2-client run over the tiny world with tiny UNets; `overrides` win."""
    base = [
        f'vae="{world["vae"]}"',
        f'data.source="{world["images"]}"',
        'data.subfolder=""',
        "data.num_clients=2",
        "server_unet.block_out_channels=[32]",
        "client_unet.block_out_channels=[32]",
        "train.server_batch_size=8",
        "train.client_batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.num_preview_images=2",
        "train.preview_inference_steps=4",
        "split.t_cut=100",
    ]
    return load_config(None, base + list(overrides))


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIPVisionModelWithProjection saved as a local folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder
