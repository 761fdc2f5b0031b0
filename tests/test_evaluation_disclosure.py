"""What releases disclose: SSIM, the DDIM reconstruction attack, re-identification, and the
FID of decoded releases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from latentfuse.evaluation import (
    InceptionExtractor,
    ddim_reconstruct,
    load_clip,
    reconstruction_attack,
    reidentification,
    release_fid,
    ssim,
)
from latentfuse.evaluation.disclosure import attack_timesteps
from latentfuse.method.split import DiffusionSplit
from tests.worlds import tiny_clip

T = 1000


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(num_train_timesteps=T).alphas_cumprod.double()


class PixelAutoencoder(torch.nn.Module):
    """An autoencoder whose latents are the images themselves: decode is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device/dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=latents)


class OracleDenoiser(torch.nn.Module):
    """Predicts the true eps of z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps for known z0."""

    def __init__(self, z0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.z0, self.abar = z0.double(), alphas_cumprod.double()

    def forward(self, sample, timestep, class_labels=None) -> SimpleNamespace:
        a = self.abar[int(timestep)]
        return SimpleNamespace(sample=((sample.double() - a.sqrt() * self.z0) / (1 - a).sqrt()))


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1], (count, 3, 32, 32): random colour gradients."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 32)
    start, end = torch.rand(count, 3, 1, 1, generator=g), torch.rand(count, 3, 1, 1, generator=g)
    direction = torch.rand(count, 1, 1, 1, generator=g)
    t = direction * ramp.view(1, 1, 32, 1) + (1 - direction) * ramp.view(1, 1, 1, 32)
    return (start + (end - start) * t) * 2 - 1


def releases_of(images: torch.Tensor, alphas_cumprod: torch.Tensor, t_cut: int, seed: int = 0):
    """z_r of `images` (used as latents) at cut `t_cut`."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return DiffusionSplit(alphas_cumprod, t_cut).release(images, eps).float()


# ---- SSIM ------------------------------------------------------------------------------------
def test_ssim_of_an_image_with_itself_is_one():
    x = (smooth_images(3, 0) + 1) / 2
    torch.testing.assert_close(ssim(x, x), torch.ones(3))


def test_ssim_falls_as_noise_grows():
    x = smooth_images(4, 1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    noisy = [((x + level * noise).clamp(-1, 1) + 1) / 2 for level in (0.05, 0.2, 1)]
    scores = [float(ssim(y, (x + 1) / 2).mean()) for y in noisy]
    assert 1 > scores[0] > scores[1] > scores[2]


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.2), (0.2, 0.6), (0.05, 0.9)])
def test_ssim_of_flat_images_has_the_closed_form(a, b):
    # No variance or covariance: SSIM = (2ab + c1) / (a^2 + b^2 + c1), c1 = (0.01 L)^2.
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01**2
    assert float(ssim(x, y)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_is_the_same_in_any_intensity_unit():
    x = (smooth_images(2, 7) + 1) / 2
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    torch.testing.assert_close(ssim(x * 255, y * 255, data_range=255), ssim(x, y))


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))


# ---- reconstruction attack -------------------------------------------------------------------
@pytest.mark.parametrize(("t_cut", "steps"), [(1, 5), (10, 3), (300, 8), (1000, 4)])
def test_attack_timesteps_run_from_the_release_level_to_zero(t_cut, steps):
    timesteps = attack_timesteps(t_cut, steps)
    assert timesteps[0] == t_cut - 1 and timesteps[-1] == 0
    assert timesteps == sorted(set(timesteps), reverse=True)
    assert len(timesteps) == min(steps, t_cut)


@pytest.mark.parametrize("t_cut", [1, 50, 400, 999])
def test_ddim_with_the_true_noise_recovers_z0(alphas_cumprod, t_cut):
    z0 = smooth_images(3, 2)
    z_r = releases_of(z0, alphas_cumprod, t_cut)
    oracle = OracleDenoiser(z0, alphas_cumprod)
    recovered = ddim_reconstruct(oracle, alphas_cumprod, z_r, t_cut, num_steps=4)
    torch.testing.assert_close(recovered, z0, atol=2e-3, rtol=0)


def test_attack_on_clean_releases_is_the_release_itself(alphas_cumprod):
    images = smooth_images(2, 3)
    result = reconstruction_attack(
        None, alphas_cumprod, PixelAutoencoder(), images, images, t_cut=0, num_steps=5
    )
    assert result["num_steps"] == 0
    torch.testing.assert_close(result["images"], images)
    assert result["ssim"] == pytest.approx(1, abs=1e-6)


def test_attack_scores_a_perfect_and_a_poor_denoiser(alphas_cumprod):
    images, t_cut = smooth_images(4, 4), 300
    z_r = releases_of(images, alphas_cumprod, t_cut)
    vae = PixelAutoencoder()
    perfect = reconstruction_attack(
        OracleDenoiser(images, alphas_cumprod), alphas_cumprod, vae, z_r, images, t_cut, 4
    )
    torch.manual_seed(0)
    random_unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=5,  # no labels given: the attacker uses the null label (4)
    ).eval()
    poor = reconstruction_attack(random_unet, alphas_cumprod, vae, z_r, images, t_cut, 4)
    assert perfect["psnr"] > 40 and perfect["ssim"] > 0.99
    assert poor["psnr"] < perfect["psnr"] and poor["ssim"] < perfect["ssim"]
    assert poor["psnr_per_image"].shape == (4,) and torch.isfinite(poor["psnr_per_image"]).all()


# ---- re-identification and release FID (Inception) -------------------------------------------
@pytest.fixture(scope="module")
def inception() -> InceptionExtractor:
    return InceptionExtractor()


def test_reidentification_finds_the_sources(inception):
    training = smooth_images(4, 5)
    order = torch.tensor([2, 0, 3, 1])
    g = torch.Generator().manual_seed(1)
    reconstructions = (training[order] + 0.02 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    result = reidentification(inception, reconstructions, training, order)
    assert result["rate"] == 1.0 and result["chance"] == 0.25
    assert torch.equal(result["nearest"], order)
    wrong = reidentification(inception, reconstructions, training, order.roll(1))
    assert wrong["rate"] == 0.0


def test_reidentification_takes_a_gallery_of_features(inception):
    from latentfuse.evaluation import extract_features, to_uint8

    training = smooth_images(4, 5)
    order = torch.tensor([3, 1, 0, 2])
    reconstructions = training[order].clone()
    gallery = extract_features(inception, to_uint8(training))
    from_features = reidentification(inception, reconstructions, gallery, order)
    from_images = reidentification(inception, reconstructions, training, order)
    assert from_features["rate"] == from_images["rate"] == 1.0
    assert from_features["chance"] == 0.25
    assert torch.equal(from_features["nearest"], from_images["nearest"])
    with pytest.raises(ValueError, match="columns"):
        reidentification(inception, reconstructions, gallery[:, :10], order)


def test_release_fid_grows_with_the_noise(inception, alphas_cumprod, tmp_path):
    from latentfuse.evaluation import to_uint8

    images = smooth_images(6, 6)
    real = to_uint8(images)
    vae = PixelAutoencoder()
    clip, _ = load_clip(tiny_clip(tmp_path / "clip"))
    low = release_fid(vae, releases_of(images, alphas_cumprod, 1), real, inception)
    high = release_fid(
        vae, releases_of(images, alphas_cumprod, 999), real, inception, clip, real_clip=real
    )
    # Inception is very sensitive to pixel noise on flat gradients: even the ~1 grey-level noise
    # of t_cut = 1 costs FID; pure noise at t_cut = 999 costs far more.
    assert 0 < low["fid"] < high["fid"] / 2
    assert low["kid"] < high["kid"]
    assert low["num_releases"] == low["num_real"] == 6
    assert low["fcd"] is None and low["fcd_status"].startswith("unavailable")
    assert high["fcd_status"] == "ok" and high["fcd"] > 0  # pure noise against the images
