"""A client's half of CollaFuse sampling: the low-noise steps t < t_cut from a hand-off, decoded.

It reads only `vae/`, `scheduler/`, `collafuse.json` and its own `clients/<id>/`: never the
server's weights nor another client's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel

from latentfuse.data.autoencoder import Autoencoder, load_vae
from latentfuse.hub import resolve_model_folder
from latentfuse.pipelines.folder import (
    CLIENTS_DIR,
    COLLAFUSE_CONFIG,
    SCHEDULER_DIR,
    VAE_DIR,
    load_scheduler,
    load_unet,
    read_description,
)
from latentfuse.pipelines.handoff import HandOff
from latentfuse.pipelines.sampling import (
    Generators,
    Labels,
    check_output_type,
    check_steps,
    client_conditioning,
    client_entry,
    client_labels,
    denoise,
    initial_latents,
    is_conditional,
    restart_client_chain,
    split_conditioning,
    split_schedule,
    start_chain,
    to_output,
)


class CollaFuseClientPipeline(DiffusionPipeline):
    """Client `client_id`'s steps of a chain, from a `HandOff` (or from noise when t_cut = T)."""

    _optional_components = ["unet"]

    def __init__(
        self,
        vae: Autoencoder,
        scheduler: SchedulerMixin,
        unet: UNet2DModel | None,
        client_id: int = 0,
        collafuse_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, scheduler=scheduler, unet=unet)
        self.client_id = int(client_id)
        self.collafuse_config = collafuse_config or {}
        client_entry(self.collafuse_config, self.client_id)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        client_id: int,
        torch_dtype: torch.dtype | None = None,
        **download_kwargs: Any,
    ) -> CollaFuseClientPipeline:
        """Load client `client_id`'s part of a model folder (or hub repo) and nothing else."""
        own = f"{CLIENTS_DIR}/{int(client_id)}"
        patterns = [f"{VAE_DIR}/*", f"{SCHEDULER_DIR}/*", COLLAFUSE_CONFIG, f"{own}/*"]
        root = resolve_model_folder(
            pretrained_model_name_or_path, allow_patterns=patterns, **download_kwargs
        )
        description = read_description(root)
        client_entry(description, client_id)
        vae = load_vae(root, subfolder=VAE_DIR, dtype=torch_dtype or torch.float32)
        unet = load_unet(root / own, torch_dtype)
        return cls(vae, load_scheduler(root), unet, client_id, description)

    @torch.no_grad()
    def __call__(
        self,
        handoff: HandOff | None = None,
        class_labels: Labels = None,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: Generators = None,
        output_type: str = "pil",
        return_dict: bool = True,
        conditioning: torch.Tensor | None = None,
        null_conditioning: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Finish the chain of `handoff` and decode it.

        A model conditioned on attributes or text takes this client's own `conditioning` rows
        ((b, A) +-1 vectors or (b, L, D) prompt states) and `null_conditioning` (the null for
        guidance): the hand-off carries class labels only.

        The hand-off fixes the labels and the schedule. Its solver state (DPM-Solver's stored
        model outputs) continues the one chain exactly; without it a multistep solver restarts
        its order at the cut (first order on the client's first step). Without a hand-off the
        client starts the chain itself, which only a schedule with no server steps allows
        (t_cut = T); then `class_labels`, `batch_size` and `num_inference_steps` apply.

        Example:
            >>> client = CollaFuseClientPipeline.from_pretrained("runs/demo/model", client_id=1)
            >>> images = client(handoff, generator=torch.manual_seed(0)).images
        """
        check_output_type(output_type)
        if handoff is None:
            latents, labels, steps = self._start(
                class_labels, batch_size, num_inference_steps, generator
            )
        else:
            given = {"class_labels": class_labels, "batch_size": batch_size}
            given["num_inference_steps"] = num_inference_steps
            named = sorted(k for k, v in given.items() if v is not None)
            if named:
                raise ValueError(f"{', '.join(named)} come from the hand-off: do not pass them")
            latents, labels, steps = self._resume(handoff)
        if len(steps):
            unet = self._unet()
            rows, null = split_conditioning(
                self.collafuse_config, labels, conditioning, null_conditioning, is_conditional(unet)
            )
            cond = client_conditioning(unet, self.collafuse_config, rows, null)
            latents = denoise(
                self.scheduler,
                self._unet(),
                latents,
                steps,
                cond,
                guidance_scale,
                generator,
                self.progress_bar,
            )
        images = to_output(self.vae, latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _unet(self) -> UNet2DModel:
        if self.unet is None:
            raise ValueError(f"client {self.client_id} has no denoiser (t_cut = 0) but got steps")
        return self.unet

    def _start(
        self,
        class_labels: Labels,
        batch_size: int | None,
        num_inference_steps: int | None,
        generator: Generators,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, labels and the whole schedule, when the server has no steps in it."""
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required when there is no hand-off")
        config, device = self.collafuse_config, self._execution_device
        labels, server_steps, client_steps = start_chain(
            self.scheduler,
            config,
            self.client_id,
            class_labels,
            batch_size,
            num_inference_steps,
            generator,
            device,
        )
        batch_size = len(labels)
        if len(server_steps):
            raise ValueError(
                f"client {self.client_id}'s cut leaves the server {len(server_steps)} of the "
                f"{num_inference_steps} steps: pass the server's hand-off"
            )
        latents = initial_latents(self._unet(), self.scheduler, batch_size, generator, device)
        return latents, labels, client_steps

    def _resume(self, handoff: HandOff) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Set the scheduler to where the server stopped; the hand-off's latents and labels."""
        if handoff.client_id != self.client_id:
            raise ValueError(f"hand-off is for client {handoff.client_id}, not {self.client_id}")
        check_steps(handoff.num_inference_steps)
        config, device = self.collafuse_config, self._execution_device
        labels = client_labels(config, self.client_id, handoff.labels, len(handoff.labels), None)
        self.scheduler.set_timesteps(handoff.num_inference_steps, device=device)
        server_steps, client_steps = split_schedule(self.scheduler, config, self.client_id)
        same = torch.equal(client_steps.cpu().double(), handoff.timesteps.cpu().double())
        if handoff.step_index != len(server_steps) or not same:
            raise ValueError(
                f"hand-off continues at step {handoff.step_index} with timesteps "
                f"{handoff.timesteps.tolist()}, but client {self.client_id}'s schedule hands "
                f"off at step {len(server_steps)} with {client_steps.tolist()} "
                "(do server and client share the scheduler configuration?)"
            )
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(handoff.step_index)
        if handoff.solver_state is not None:
            handoff.solver_state.restore(self.scheduler)
        restart_client_chain(self.scheduler, server_steps, client_steps)
        dtype = (self.unet or self.vae).dtype
        return handoff.latents.to(device=device, dtype=dtype), labels.to(device), client_steps
