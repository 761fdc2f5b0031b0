"""Sampling through the server: it runs t >= t_cut, this client finishes and decodes locally.

Only seeds, labels and the schedule go out (and, where the server sees the conditioning, the
attribute rows or prompts); the hand-off latents come back. The client's denoiser, its decoder
and the images never leave the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentfuse.conditioning import TextConditioner
from latentfuse.deploy.client.remote import RemoteError, RemoteServer
from latentfuse.deploy.config import sampling_scheduler
from latentfuse.deploy.wire import SampleRequest
from latentfuse.pipelines import CollaFuseClientPipeline
from latentfuse.pipelines.sampling import (
    attribute_prompts,
    class_prompts,
    client_entry,
    client_labels,
    conditioning_kind,
    draw_attributes,
)


@dataclass(frozen=True)
class ChainConditioning:
    """What the chains of one request are conditioned on, beyond their class labels."""

    rows: torch.Tensor | None = None  # (b, A) +-1 vectors or (b, L, D) states; None: labels
    null: torch.Tensor | None = None  # the null for guidance
    attributes: tuple[tuple[int, ...], ...] | None = None  # 0/1, what a request names
    prompts: tuple[str, ...] | None = None


def client_text(model_dir: str | Path, description: dict[str, Any]) -> TextConditioner | None:
    """The public text encoder saved in a text-conditioned client's model folder."""
    conditioning = description.get("conditioning", {})
    if conditioning.get("kind") != "text":
        return None
    return TextConditioner.load(model_dir, conditioning.get("max_length", 32))


def chain_conditioning(
    description: dict[str, Any],
    client_id: int,
    seeds: tuple[int, ...],
    labels: torch.Tensor,
    text: TextConditioner | None,
) -> ChainConditioning:
    """The conditioning the in-process pipeline gives these chains when none is passed:
    attribute vectors drawn from the client's rates, keyed by the seeds (so the request and
    the finish compute the same), and for text their prompts (or the class names')."""
    kind = conditioning_kind(description)
    if kind == "class":
        return ChainConditioning()
    vectors = None
    if client_entry(description, client_id).get("attribute_rates") is not None:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        vectors = draw_attributes(description, client_id, len(seeds), generators)
    if kind == "attributes":
        if vectors is None:
            raise ValueError(f"client {client_id} records no attribute rates to draw from")
        attributes = tuple(tuple(int(v > 0) for v in row) for row in vectors.tolist())
        return ChainConditioning(vectors, torch.zeros(vectors.shape[1]), attributes=attributes)
    if text is None:
        raise ValueError("a text-conditioned model needs its text encoder to sample")
    if vectors is not None:
        prompts = attribute_prompts(description, vectors)
    else:
        prompts = class_prompts(description, labels)
    return ChainConditioning(text.embed(prompts), text.embed([""])[0], prompts=tuple(prompts))


def make_request(
    description: dict[str, Any],
    client_id: int,
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    scheduler: str,
    text: TextConditioner | None = None,
    class_label: int | None = None,
) -> SampleRequest:
    """A request for one chain per seed: labels drawn from the client's classes (or
    `class_label`); the attribute rows or prompts where the server sees the conditioning."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    labels = client_labels(description, client_id, class_label, len(seeds), generators)
    chains = chain_conditioning(description, client_id, tuple(seeds), labels, text)
    sees = description.get("server_labels", "class") == "class"
    return SampleRequest(
        client_id,
        tuple(seeds),
        tuple(labels.tolist()),
        num_inference_steps,
        guidance_scale,
        scheduler,
        attributes=chains.attributes if sees else None,
        prompts=chains.prompts if sees else None,
    )


def finish_remote(
    remote: RemoteServer,
    pipe: CollaFuseClientPipeline,
    request: SampleRequest,
    output_type: str = "pt",
    text: TextConditioner | None = None,
) -> torch.Tensor:
    """The images of `request`: the server's hand-off, finished by `pipe` (this client's half)
    with the chains' own conditioning (`chain_conditioning`; `text`: the public encoder of a
    text-conditioned model)."""
    handoff, states = remote.request_handoff(request)
    if handoff.client_id != request.client_id or handoff.labels.tolist() != list(
        request.class_labels
    ):
        raise RemoteError("the server's hand-off does not answer this request (client or labels)")
    chains = chain_conditioning(
        pipe.collafuse_config, request.client_id, request.seeds, handoff.labels, text
    )
    generators = [torch.Generator().manual_seed(s) for s in request.seeds]
    if states is not None:  # continue the streams where the server's steps left them
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state.clone())
    return pipe(
        handoff,
        guidance_scale=float(request.guidance_scale),
        generator=generators,
        output_type=output_type,
        conditioning=chains.rows,
        null_conditioning=chains.null,
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
    text = client_text(client_dir, pipe.collafuse_config)
    if guidance_scale is None:
        from latentfuse.description import default_guidance

        guidance_scale = default_guidance(pipe.collafuse_config)
    per_request = remote.limits()["max_sample_batch"]
    seeds = [seed * 100_000 + i for i in range(num_images)]
    images = []
    for start in range(0, num_images, per_request):
        part = seeds[start : start + per_request]
        request = make_request(
            pipe.collafuse_config,
            remote.client_id,
            part,
            num_inference_steps,
            guidance_scale,
            scheduler,
            text,
            class_label,
        )
        images.append(finish_remote(remote, pipe, request, text=text))
    return torch.cat(images)
