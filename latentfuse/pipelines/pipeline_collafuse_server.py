"""The server's half of CollaFuse sampling: the high-noise steps t >= t_cut, then a hand-off.

It reads only `scheduler/`, `server_unet/` and `collafuse.json` of a model folder.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DModel

from latentfuse.hub import resolve_model_folder
from latentfuse.pipelines.folder import (
    COLLAFUSE_CONFIG,
    SCHEDULER_DIR,
    SERVER_DIR,
    load_scheduler,
    load_unet,
    read_description,
)
from latentfuse.pipelines.handoff import HandOff, SolverState
from latentfuse.pipelines.sampling import (
    Generators,
    Labels,
    denoise,
    initial_latents,
    is_conditional,
    server_conditioning,
    split_conditioning,
    start_chain,
)


class CollaFuseServerPipeline(DiffusionPipeline):
    """The server's steps of one chain for a client; returns the `HandOff` the client finishes."""

    def __init__(
        self,
        scheduler: SchedulerMixin,
        server_unet: UNet2DModel,
        collafuse_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_modules(scheduler=scheduler, server_unet=server_unet)
        self.collafuse_config = collafuse_config or {}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        **download_kwargs: Any,
    ) -> CollaFuseServerPipeline:
        """Load the server's part of a model folder (or hub repo), nothing of the clients'."""
        patterns = [f"{SCHEDULER_DIR}/*", f"{SERVER_DIR}/*", COLLAFUSE_CONFIG]
        root = resolve_model_folder(
            pretrained_model_name_or_path, allow_patterns=patterns, **download_kwargs
        )
        description = read_description(root)
        unet = load_unet(root / SERVER_DIR, torch_dtype)
        if unet is None:
            raise FileNotFoundError(
                f"{root} has no {SERVER_DIR}/: a model of independent clients (t_cut = T) "
                "has no server"
            )
        return cls(load_scheduler(root), unet, description)

    @torch.no_grad()
    def __call__(
        self,
        client_id: int = 0,
        class_labels: Labels = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Generators = None,
        conditioning: torch.Tensor | None = None,
        null_conditioning: torch.Tensor | None = None,
    ) -> HandOff:
        """Run the steps t >= t_cut of client `client_id`'s chain; labels as CollaFusePipeline.

        A model conditioned on attributes or text takes each image's `conditioning` rows
        ((b, A) +-1 vectors or (b, L, D) prompt states) and their `null_conditioning` (one row
        or b) where the server sees the conditioning (server_labels "class"); the hand-off
        carries the class labels only, and the client finishes with its own rows.

        Example:
            >>> server = CollaFuseServerPipeline.from_pretrained("runs/demo/model")
            >>> handoff = server(client_id=1, batch_size=4, generator=torch.manual_seed(0))
            >>> tensors, meta = handoff.to_tensors()  # what goes over the wire
        """
        config, device, unet = self.collafuse_config, self._execution_device, self.server_unet
        labels, server_steps, client_steps = start_chain(
            self.scheduler,
            config,
            client_id,
            class_labels,
            batch_size,
            num_inference_steps,
            generator,
            device,
        )
        batch_size = len(labels)
        latents = initial_latents(unet, self.scheduler, batch_size, generator, device)
        sees = is_conditional(unet) and config.get("server_labels", "class") == "class"
        rows, null = split_conditioning(config, labels, conditioning, null_conditioning, sees)
        cond = server_conditioning(unet, config, client_id, rows, null)
        latents = denoise(
            self.scheduler,
            unet,
            latents,
            server_steps,
            cond,
            guidance_scale,
            generator,
            self.progress_bar,
        )
        return HandOff(
            latents=latents,
            labels=labels,
            client_id=client_id,
            num_inference_steps=num_inference_steps,
            step_index=len(server_steps),
            timesteps=client_steps,
            solver_state=SolverState.capture(self.scheduler),
        )
