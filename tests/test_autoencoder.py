"""The frozen autoencoder: loading, scaled encode/decode, fingerprint, PSNR, shipped checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VAE_SCALING_FACTOR
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny
from PIL import Image

from latentfuse.data.autoencoder import (
    decode,
    encode,
    latent_geometry,
    load_vae,
    psnr,
    vae_fingerprint,
)
from latentfuse.paths import CIFAR10_ARCHIVE

SHIPPED_VAE_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10-vae"
SHIPPED_MIN_PSNR_DB = 27.0  # the target is 28 dB; the floor leaves a little room
SHIPPED_NUM_IMAGES = 64


def _images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1], (b, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture
def tiny_taesd_dir(tmp_path: Path) -> Path:
    """A randomly initialised AutoencoderTiny (32x32 -> 4x16x16) saved as a diffusers folder."""
    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
        scaling_factor=0.75,
    )
    folder = tmp_path / "tiny-taesd"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize(
    ("fixture", "expected_class"),
    [("tiny_vae_dir", AutoencoderKL), ("tiny_taesd_dir", AutoencoderTiny)],
)
def test_load_vae_is_frozen(
    fixture: str, expected_class: type, request: pytest.FixtureRequest
) -> None:
    vae = load_vae(request.getfixturevalue(fixture))
    assert type(vae) is expected_class
    assert not vae.training
    assert all(not module.training for module in vae.modules())
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.dtype == torch.float32


@pytest.mark.parametrize("fixture", ["tiny_vae_dir", "tiny_taesd_dir"])
def test_encode_decode_shapes(fixture: str, request: pytest.FixtureRequest) -> None:
    vae = load_vae(request.getfixturevalue(fixture))
    images = _images(3)
    latents = encode(vae, images)
    assert latents.shape == (3, 4, 16, 16)
    recon = decode(vae, latents)
    assert recon.shape == images.shape
    assert -1.0 <= recon.min() <= recon.max() <= 1.0


def test_load_vae_rejects_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vae"
    with pytest.raises(OSError, match=str(missing)):
        load_vae(missing)


def test_load_vae_rejects_a_folder_without_config(tiny_vae_dir: Path) -> None:
    (tiny_vae_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tiny_vae_dir)


@pytest.mark.parametrize("sample", [False, True])
def test_encode_applies_the_scaling_factor(tiny_vae_dir: Path, sample: bool) -> None:
    vae = load_vae(tiny_vae_dir)
    assert vae.config.scaling_factor == TINY_VAE_SCALING_FACTOR
    images = _images(2)
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        raw = dist.sample(torch.Generator().manual_seed(3)) if sample else dist.mode()
    latents = encode(vae, images, sample=sample, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents, raw * TINY_VAE_SCALING_FACTOR)
    # decode undoes the scaling: it must feed the raw latents to the decoder.
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(vae, latents), expected)


def _perturb_encoder_weight(vae: AutoencoderKL) -> None:
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3


def _perturb_decoder_bias(vae: AutoencoderKL) -> None:
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3


def _change_scaling_factor(vae: AutoencoderKL) -> None:
    vae.register_to_config(scaling_factor=TINY_VAE_SCALING_FACTOR * 2)


@pytest.mark.parametrize(
    "change", [_perturb_encoder_weight, _perturb_decoder_bias, _change_scaling_factor]
)
def test_vae_fingerprint_changes(
    tiny_vae_dir: Path, change: Callable[[AutoencoderKL], None]
) -> None:
    vae = load_vae(tiny_vae_dir)
    before = vae_fingerprint(vae)
    assert vae_fingerprint(load_vae(tiny_vae_dir)) == before  # stable across loads
    change(vae)
    assert vae_fingerprint(vae) != before


def test_vae_fingerprint_is_the_same_from_any_folder(tiny_vae_dir: Path, tmp_path: Path) -> None:
    """A model folder's recorded vae_sha256 must match the copy shipped in it."""
    import shutil

    copy = shutil.copytree(tiny_vae_dir, tmp_path / "elsewhere" / "vae")
    assert vae_fingerprint(load_vae(copy)) == vae_fingerprint(load_vae(tiny_vae_dir))


def test_vae_fingerprint_sees_the_config_on_disk(tiny_vae_dir: Path) -> None:
    before = vae_fingerprint(load_vae(tiny_vae_dir))
    config_file = tiny_vae_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["scaling_factor"] = 0.25
    config_file.write_text(json.dumps(config))
    assert vae_fingerprint(load_vae(tiny_vae_dir)) != before


def test_psnr_of_identical_images_is_large() -> None:
    images = _images(4)
    assert psnr(images, images).shape == (4,)
    assert (psnr(images, images) >= 100).all()


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_psnr_matches_the_definition(noise: float) -> None:
    generator = torch.Generator().manual_seed(1)
    # Keep both images inside [-1, 1] so psnr's clamp does not change them.
    reference = _images(3) * 0.5
    estimate = reference + noise * (torch.rand(reference.shape, generator=generator) * 2 - 1)
    mse = (reference - estimate).pow(2).flatten(1).mean(1)  # on the [-1, 1] scale
    # Peak-to-peak is 2 on the [-1, 1] scale: PSNR = 10 log10(2^2 / mse).
    expected = torch.tensor([10 * math.log10(4 / m) for m in mse.tolist()])
    torch.testing.assert_close(psnr(reference, estimate), expected, rtol=1e-4, atol=1e-4)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_shipped_vae_reconstructs_cifar10_train_images() -> None:
    """The shipped checkpoint works with plain diffusers: no latentfuse code in the loop."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip("CIFAR-10 archive not present")
    from latentfuse.data.datasets import load_cifar10

    assert (SHIPPED_VAE_DIR / "config.json").is_file(), (
        f"shipped autoencoder missing: {SHIPPED_VAE_DIR} (train it with "
        "scripts/train_autoencoder.py --config configs/autoencoder.toml)"
    )
    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE_DIR, torch_dtype=torch.float32).eval()
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor != 1.0

    dataset = load_cifar10("train")  # the autoencoder trained on the test split only
    picks = np.random.default_rng(0).choice(len(dataset), SHIPPED_NUM_IMAGES, replace=False)
    pixels = np.stack([_read_rgb(dataset.records[i].path) for i in picks])  # (b, 32, 32, 3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0  # (b, 3, 32, 32)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()  # (b, 4, 16, 16)
        recon = vae.decode(latents).sample.clamp(-1, 1)
    assert latents.shape == (SHIPPED_NUM_IMAGES, 4, 16, 16)
    mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    mean_psnr = (-10 * torch.log10(mse)).mean().item()
    assert mean_psnr >= SHIPPED_MIN_PSNR_DB, f"mean PSNR {mean_psnr:.2f} dB"


# ---- every autoencoder diffusers has, normalised as diffusers' pipelines do -------------------
def _kl_8x(**config) -> AutoencoderKL:
    """A tiny AutoencoderKL with 4 blocks: 8x downsampling, as Stable Diffusion's."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        **config,
    ).eval()


def _dc_4x() -> AutoencoderDC:
    """A tiny AutoencoderDC with 3 stages: 4x downsampling, 8 latent channels."""
    torch.manual_seed(0)
    return AutoencoderDC(
        latent_channels=8,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3,
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        scaling_factor=0.41,
    ).eval()


MEAN, STD = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.7, 1.3]


@pytest.mark.parametrize(
    "config, to_model, to_decoder",
    [
        # Stable Diffusion 1.x/2.x: latents * scaling_factor; decode latents / scaling_factor
        ({"scaling_factor": 0.18215}, lambda r: r * 0.18215, lambda z: z / 0.18215),
        # SD3 / FLUX.1 (pipeline_stable_diffusion_3.py): (latents - shift) * scaling on encode,
        # latents / scaling_factor + shift_factor before vae.decode
        (
            {"scaling_factor": 1.5305, "shift_factor": 0.0609},
            lambda r: (r - 0.0609) * 1.5305,
            lambda z: z / 1.5305 + 0.0609,
        ),
        # SDXL-type configs (pipeline_stable_diffusion_xl.py): latents * latents_std /
        # scaling_factor + latents_mean before vae.decode; its img2img encodes the inverse
        (
            {"scaling_factor": 0.5, "latents_mean": MEAN, "latents_std": STD},
            lambda r: (
                (r - torch.tensor(MEAN).view(1, 4, 1, 1)) * 0.5 / torch.tensor(STD).view(1, 4, 1, 1)
            ),
            lambda z: (
                z * torch.tensor(STD).view(1, 4, 1, 1) / 0.5 + torch.tensor(MEAN).view(1, 4, 1, 1)
            ),
        ),
    ],
    ids=["scaling", "shift", "mean-std"],
)
def test_latents_are_normalised_by_diffusers_arithmetic(tmp_path, config, to_model, to_decoder):
    """64x64 images through an 8x AutoencoderKL saved with each convention and loaded back."""
    _kl_8x(**config).save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    images = _images(2, size=64)
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
    latents = encode(vae, images)
    assert latents.shape == (2, 4, 8, 8)
    assert latent_geometry(json.loads((tmp_path / "vae" / "config.json").read_text())) == (4, 8)
    torch.testing.assert_close(latents, to_model(raw))
    with torch.no_grad():
        expected = vae.decode(to_decoder(latents)).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(vae, latents), expected)


def test_autoencoder_dc_and_tiny_load_encode_and_decode(tmp_path, tiny_taesd_dir):
    _dc_4x().save_pretrained(tmp_path / "dc")
    dc = load_vae(tmp_path / "dc")
    assert isinstance(dc, AutoencoderDC)
    assert latent_geometry(json.loads((tmp_path / "dc" / "config.json").read_text())) == (8, 4)
    images = _images(2, size=64)
    with torch.no_grad():
        raw = dc.encode(images).latent
    latents = encode(dc, images)
    assert latents.shape == (2, 8, 16, 16)
    torch.testing.assert_close(latents, raw * 0.41)  # Sana: latents / scaling_factor to decode
    with torch.no_grad():
        expected = dc.decode(latents / 0.41).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(dc, latents), expected)
    tiny = load_vae(tiny_taesd_dir)
    assert isinstance(tiny, AutoencoderTiny)
    config = json.loads((tiny_taesd_dir / "config.json").read_text())
    channels, factor = latent_geometry(config)
    assert encode(tiny, _images(1)).shape == (1, channels, 32 // factor, 32 // factor)


def test_an_unsupported_autoencoder_class_is_named(tmp_path, tiny_vae_dir):
    config = json.loads((tiny_vae_dir / "config.json").read_text())
    (tiny_vae_dir / "config.json").write_text(json.dumps(config | {"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel is not supported"):
        load_vae(tiny_vae_dir)
