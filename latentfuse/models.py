"""Denoiser construction and EMA weights."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from latentfuse.config import UNetConfig


def build_unet(
    cfg: UNetConfig, sample_size: int, channels: int, num_class_embeds: int | None
) -> UNet2DModel:
    """A diffusers UNet2DModel over latents (channels, sample_size, sample_size).

    `num_class_embeds` includes the null label used for classifier-free guidance (the last
    index); None builds an unconditional model.
    """
    depth = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * depth
    up = ["UpBlock2D"] * depth
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=num_class_embeds,
        add_attention=cfg.attention,
    )


class EMA:
    """Exponential moving average of a module's parameters, kept as plain named tensors."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * weights, with the usual warm-up of d."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in module.state_dict().items():
            if self.shadow[name].device != value.device:  # follow the model onto its device
                self.shadow[name] = self.shadow[name].to(value.device)
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.detach().float(), 1 - decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the averaged weights into `module` (in its own dtype) and return it."""
        module.load_state_dict(
            {k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()}
        )
        return module

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The shadow weights under `prefix.` for a safetensors file."""
        return {f"{prefix}.{k}": v.contiguous() for k, v in self.shadow.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Inverse of `state_tensors`."""
        for name in self.shadow:
            self.shadow[name] = tensors[f"{prefix}.{name}"].clone()


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
