"""CollaFusePipeline: the server denoises the high-noise steps, a client the rest, then decodes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from latentfuse.split import DiffusionSplit

COLLAFUSE_CONFIG = "collafuse.json"
CLIENTS_DIR = "clients"


def guided_noise(
    unet: UNet2DModel,
    latents: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    null_label: int | None,
    guidance_scale: float,
) -> torch.Tensor:
    """eps prediction, with classifier-free guidance when `guidance_scale` != 1."""
    if labels is None or null_label is None or guidance_scale == 1.0:
        return unet(latents, t, class_labels=labels).sample
    null = torch.full_like(labels, null_label)
    both = unet(torch.cat([latents, latents]), t, class_labels=torch.cat([labels, null])).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class CollaFusePipeline(DiffusionPipeline):
    """Split sampling of a CollaFuse model: server steps t >= t_cut, client steps t < t_cut."""

    _optional_components = ["server_unet"]

    def __init__(
        self,
        vae: AutoencoderKL,
        scheduler,
        server_unet: UNet2DModel | None,
        client_unets: dict[int, UNet2DModel] | None = None,
        collafuse_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, scheduler=scheduler, server_unet=server_unet)
        self.client_unets = {int(k): v for k, v in (client_unets or {}).items()}
        self.collafuse_config = collafuse_config or {}

    # ---- configuration ---------------------------------------------------------------------
    def client_info(self, client_id: int) -> dict[str, Any]:
        """The saved description of one client (t_cut, classes)."""
        clients = self.collafuse_config.get("clients", {})
        if str(client_id) not in clients:
            raise ValueError(
                f"unknown client_id {client_id}; this model has clients "
                f"{sorted(int(k) for k in clients)}"
            )
        return clients[str(client_id)]

    @property
    def num_classes(self) -> int:
        """Number of class labels (the null label for guidance is this index)."""
        return len(self.collafuse_config.get("class_names", []))

    def _split(self, client_id: int) -> DiffusionSplit:
        return DiffusionSplit.from_scheduler(self.scheduler, self.client_info(client_id)["t_cut"])

    def _server_labels(
        self, labels: torch.Tensor, client_id: int
    ) -> tuple[torch.Tensor | None, int | None]:
        mode = self.collafuse_config.get("server_labels", "class")
        if mode == "class":
            return labels, self.num_classes
        if mode == "client":
            num_clients = len(self.collafuse_config.get("clients", {}))
            return torch.full_like(labels, client_id), num_clients
        return None, None

    def _check_labels(
        self, client_id: int, class_labels, batch_size: int, generator
    ) -> torch.Tensor:
        allowed = self.client_info(client_id)["classes"]
        if class_labels is None:
            picks = torch.randint(
                len(allowed),
                (batch_size,),
                generator=generator if isinstance(generator, torch.Generator) else None,
            )
            return torch.tensor(allowed)[picks]
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        bad = [int(y) for y in labels if int(y) not in allowed]
        if bad:
            raise ValueError(
                f"class_labels {bad} are not among client {client_id}'s classes {allowed}"
            )
        if len(labels) == 1 and batch_size > 1:
            labels = labels.repeat(batch_size)
        if len(labels) != batch_size:
            raise ValueError(f"class_labels has {len(labels)} entries, batch_size is {batch_size}")
        return labels

    # ---- sampling --------------------------------------------------------------------------
    def initial_latents(self, batch_size: int, generator, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian latents; a generator list gives each image its own stream."""
        unet = self.server_unet or next(iter(self.client_unets.values()))
        shape = (
            batch_size,
            unet.config.in_channels,
            unet.config.sample_size,
            unet.config.sample_size,
        )
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    def denoise(
        self,
        unet: UNet2DModel,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        null_label: int | None,
        guidance_scale: float,
        generator,
    ) -> torch.Tensor:
        """Run `timesteps` of the chain with `unet`, continuing the scheduler's state."""
        for t in self.progress_bar(timesteps):
            noise = guided_noise(unet, latents, t, labels, null_label, guidance_scale)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        scaling = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        return self.vae.decode(latents.to(self.vae.dtype) / scaling).sample.clamp(-1, 1)

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Images in [-1, 1] -> "pt" (in [0, 1]), "np" (b, h, w, c) or "pil"."""
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(array) if output_type == "pil" else array

    @torch.no_grad()
    def __call__(
        self,
        client_id: int = 0,
        class_labels=None,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_server_latents: bool = False,
    ):
        """Sample images for one client.

        Example:
            >>> pipe = CollaFusePipeline.from_pretrained("checkpoints/cifar10-collafuse")
            >>> images = pipe(client_id=2, batch_size=4, num_inference_steps=50).images
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(
                f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}"
            )
        if isinstance(generator, list):
            batch_size = len(generator)
        split = self._split(client_id)
        labels = self._check_labels(client_id, class_labels, batch_size, generator)
        labels = labels.to(self._execution_device)
        dtype = (self.server_unet or self.client_unets[client_id]).dtype
        latents = self.initial_latents(batch_size, generator, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        server_steps, client_steps = split.split_timesteps(self.scheduler.timesteps.cpu())
        if len(server_steps):
            if self.server_unet is None:
                raise ValueError("this model has no server denoiser but the cut needs one")
            server_labels, server_null = self._server_labels(labels, client_id)
            latents = self.denoise(
                self.server_unet,
                latents,
                server_steps,
                server_labels,
                server_null,
                guidance_scale,
                generator,
            )
        handoff = latents
        if len(client_steps):
            latents = self.denoise(
                self.client_unets[client_id],
                latents,
                client_steps,
                labels,
                self.num_classes,
                guidance_scale,
                generator,
            )
        outputs = self._outputs(latents, handoff, output_type, return_server_latents)
        if not return_dict:
            return outputs
        result = ImagePipelineOutput(images=outputs[0])
        if return_server_latents:
            result["server_latents"], result["server_images"] = outputs[1], outputs[2]
        return result

    def _outputs(self, latents, handoff, output_type: str, with_handoff: bool) -> tuple:
        if output_type == "latent":
            return (latents, handoff, None) if with_handoff else (latents,)
        images = self.postprocess(self.decode_latents(latents), output_type)
        if not with_handoff:
            return (images,)
        return images, handoff, self.postprocess(self.decode_latents(handoff), output_type)

    # ---- save / load -----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The diffusers folder plus `clients/<id>/` denoisers and `collafuse.json`."""
        super().save_pretrained(save_directory, **kwargs)
        root = Path(save_directory)
        for client_id, unet in self.client_unets.items():
            unet.save_pretrained(root / CLIENTS_DIR / str(client_id), safe_serialization=True)
        (root / COLLAFUSE_CONFIG).write_text(json.dumps(self.collafuse_config, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load what `train.py` or `save_pretrained` wrote, from a folder or a hub id."""
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(str(pretrained_model_name_or_path)))
        config_file = root / COLLAFUSE_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{root} has no {COLLAFUSE_CONFIG}: not a CollaFuse model")
        config = json.loads(config_file.read_text())
        dtype = kwargs.get("torch_dtype")
        clients = {
            int(cid): UNet2DModel.from_pretrained(
                root / CLIENTS_DIR / cid, **({"torch_dtype": dtype} if dtype else {})
            )
            for cid in config.get("clients", {})
            if (root / CLIENTS_DIR / cid / "config.json").is_file()
        }
        return super().from_pretrained(
            root, client_unets=clients, collafuse_config=config, **kwargs
        )

    def to(self, *args, **kwargs):
        """Move every denoiser, the client ones included."""
        super().to(*args, **kwargs)
        for unet in self.client_unets.values():
            unet.to(*args, **kwargs)
        return self
