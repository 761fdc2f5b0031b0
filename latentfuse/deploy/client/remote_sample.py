"""Sampling through the server: it runs t >= t_cut, this client finishes and decodes locally.

Only seeds, labels and the schedule go out; the hand-off latents come back. The client's
denoiser, its decoder and the images never leave the client.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentfuse.deploy.client.remote import RemoteError, RemoteServer
from latentfuse.deploy.config import sampling_scheduler
from latentfuse.deploy.wire import SampleRequest
from latentfuse.pipelines import CollaFuseClientPipeline
from latentfuse.pipelines.sampling import client_labels


def finish_remote(
    remote: RemoteServer,
    pipe: CollaFuseClientPipeline,
    request: SampleRequest,
    output_type: str = "pt",
) -> torch.Tensor:
    """The images of `request`: the server's hand-off, finished by `pipe` (this client's half)."""
    handoff, states = remote.request_handoff(request)
    if handoff.client_id != request.client_id or handoff.labels.tolist() != list(
        request.class_labels
    ):
        raise RemoteError("the server's hand-off does not answer this request (client or labels)")
    generators = [torch.Generator().manual_seed(s) for s in request.seeds]
    if states is not None:  # continue the streams where the server's steps left them
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state.clone())
    return pipe(
        handoff,
        guidance_scale=float(request.guidance_scale),
        generator=generators,
        output_type=output_type,
    ).images


def sample_remote(
    remote: RemoteServer,
    client_dir: str | Path,
    num_images: int,
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    guidance_scale: float | None = None,
    seed: int = 0,
    class_label: int | None = None,
) -> torch.Tensor:
    """`num_images` images (b, 3, h, w) in [0, 1]; image i uses seed `seed * 100_000 + i`;
    guidance None: what the client's model folder records."""
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    pipe = CollaFuseClientPipeline.from_pretrained(client_dir, client_id=remote.client_id)
    pipe.scheduler = sampling_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:
        from latentfuse.description import default_guidance

        guidance_scale = default_guidance(pipe.collafuse_config)
    per_request = remote.limits()["max_sample_batch"]
    seeds = [seed * 100_000 + i for i in range(num_images)]
    images = []
    for start in range(0, num_images, per_request):
        part = seeds[start : start + per_request]
        generators = [torch.Generator().manual_seed(s) for s in part]
        labels = client_labels(
            pipe.collafuse_config, remote.client_id, class_label, len(part), generators
        )
        request = SampleRequest(
            remote.client_id,
            tuple(part),
            tuple(labels.tolist()),
            num_inference_steps,
            guidance_scale,
            scheduler,
        )
        images.append(finish_remote(remote, pipe, request))
    return torch.cat(images)
