"""CollaFusePipeline: the server denoises the high-noise steps, a client the rest, then decodes."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DiffusionPipeline,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DConditionModel,
    UNet2DModel,
)

from latentfuse.conditioning import TextConditioner
from latentfuse.data.autoencoder import Autoencoder
from latentfuse.hub import model_card, push_folder, resolve_model_folder
from latentfuse.pipelines.folder import (
    CLIENTS_DIR,
    COLLAFUSE_CONFIG,
    SERVER_DIR,
    load_unet,
    read_description,
)
from latentfuse.pipelines.sampling import (
    Generators,
    Labels,
    attribute_prompts,
    attribute_rows,
    check_output_type,
    class_prompts,
    client_conditioning,
    client_entry,
    conditioning_kind,
    denoise,
    draw_attributes,
    initial_latents,
    restart_client_chain,
    server_conditioning,
    start_chain,
    to_output,
)


@dataclass
class CollaFusePipelineOutput(ImagePipelineOutput):
    """Images, and when asked the hand-off latents (at the cut) and their decoded images."""

    server_latents: torch.Tensor | None = None
    server_images: Any = None


class CollaFusePipeline(DiffusionPipeline):
    """Split sampling of a CollaFuse model: server steps t >= t_cut, client steps t < t_cut."""

    _optional_components = ["server_unet", "tokenizer", "text_encoder"]

    def __init__(
        self,
        vae: Autoencoder,
        scheduler: SchedulerMixin,
        server_unet: UNet2DModel | UNet2DConditionModel | None,
        client_unets: dict[int, torch.nn.Module] | None = None,
        collafuse_config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        text_encoder: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            scheduler=scheduler,
            server_unet=server_unet,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
        )
        self.client_unets = {int(k): v for k, v in (client_unets or {}).items()}
        self.collafuse_config = collafuse_config or {}

    @property
    def client_ids(self) -> list[int]:
        """The ids of this model's clients."""
        self._load_clients_if_missing()
        return sorted(int(k) for k in self.collafuse_config.get("clients", {}))

    @property
    def components(self) -> dict[str, Any]:
        """diffusers' components plus the client denoisers and the description, so that
        `CollaFusePipeline(**pipe.components)` is a working pipeline."""
        self._load_clients_if_missing()
        return {
            **super().components,
            "client_unets": self.client_unets,
            "collafuse_config": self.collafuse_config,
        }

    def _load_clients_if_missing(self) -> None:
        """A pipeline that diffusers' own loader built (`DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=...)`) has no clients yet: read them from its folder."""
        if self.collafuse_config or not getattr(self.config, "_name_or_path", None):
            return
        root = Path(self.config._name_or_path)
        if not (root / COLLAFUSE_CONFIG).is_file():
            root = resolve_model_folder(self.config._name_or_path)
        self.collafuse_config = read_description(root)
        dtype = (self.server_unet or self.vae).dtype
        for cid in self.collafuse_config["clients"]:
            unet = load_unet(root / CLIENTS_DIR / cid, dtype)
            if unet is not None:
                self.client_unets[int(cid)] = unet.to(self.vae.device)

    def handoff_t(self, client_id: int) -> int:
        """Client `client_id`'s hand-off: it owns t < handoff_t, the server t >= handoff_t
        (collafuse.json's "t_cut"; above the configured cut only with a server buffer)."""
        return int(client_entry(self.collafuse_config, client_id)["t_cut"])

    def denoiser(self, client_id: int, side: Literal["server", "client"]) -> UNet2DModel:
        """The server's denoiser or client `client_id`'s; ValueError if the model lacks it."""
        unet = self.server_unet if side == "server" else self.client_unets.get(client_id)
        if unet is None:
            raise ValueError(
                f"client {client_id}'s hand-off {self.handoff_t(client_id)} needs a {side} "
                f"denoiser for this schedule, but this model has none"
            )
        return unet

    @torch.no_grad()
    def __call__(
        self,
        client_id: int | None = None,
        class_labels: Labels = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Generators = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_server_latents: bool = False,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        attributes: Any = None,
    ) -> CollaFusePipelineOutput | tuple:
        """Sample images for client `client_id` (labels drawn from its classes if not given).

        The conditioning follows the model's kind (`collafuse_config["conditioning"]`):
        `class_labels` for class labels; `attributes` (0/1 rows, or lists of attribute names)
        for attribute vectors; `prompt` / `prompt_embeds` (with `negative_prompt` /
        `negative_prompt_embeds` as the guidance's null) for text. What is not given is drawn
        from the client's classes or attribute rates.

        `batch_size` defaults to the length of a generator list or of `class_labels`, else 1.
        `return_server_latents` adds the hand-off latents (at the cut) and their decoding.
        As in diffusers' pipelines: `num_images_per_prompt` images per label (or in all when no
        labels are given), `latents` the initial noise (b, c, h, w), and
        `callback_on_step_end(pipe, step, t, {"latents": ...})` after every step of the whole
        chain (server and client steps), whose returned "latents" replace the chain's.

        Example:
            >>> pipe = CollaFusePipeline.from_pretrained("runs/demo/model")
            >>> generators = [torch.Generator().manual_seed(i) for i in range(4)]
            >>> images = pipe(client_id=1, generator=generators, num_inference_steps=50).images
        """
        check_output_type(output_type)
        self._load_clients_if_missing()
        if client_id is None:  # diffusers' pipe() with no arguments: the first client, said
            ids = self.client_ids
            client_id = ids[0] if ids else 0
            if len(ids) > 1:
                warnings.warn(
                    f"no client_id given: sampling client {client_id}'s images (this model has "
                    f"clients {ids}); pass client_id= to choose",
                    stacklevel=2,
                )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}"
            )
        unknown = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may name only 'latents', got {sorted(unknown)}"
            )
        kind = conditioning_kind(self.collafuse_config)
        given = self._check_conditioning(kind, class_labels, prompt, prompt_embeds, attributes)
        if given is not None and batch_size is None and not isinstance(generator, list):
            batch_size = given if given > 1 else None
        noise_sets_batch = latents is not None and batch_size is None and class_labels is None
        noise_sets_batch = noise_sets_batch and not given
        if noise_sets_batch:  # the given noise holds every image, as in diffusers
            batch_size = latents.shape[0]
        if num_images_per_prompt > 1 and not noise_sets_batch:
            if class_labels is not None:
                repeated = torch.as_tensor(class_labels).reshape(-1)
                class_labels = repeated.repeat_interleave(num_images_per_prompt).tolist()
            elif not isinstance(generator, list):
                batch_size = (batch_size or 1) * num_images_per_prompt
        repeats = num_images_per_prompt if given and not noise_sets_batch else 1
        config, device = self.collafuse_config, self._execution_device
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
        cond_rows, null = self._conditioning(
            kind,
            client_id,
            labels,
            generator,
            repeats,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            attributes,
        )
        first = self.denoiser(client_id, "server" if len(server_steps) else "client")  # shape
        if latents is None:
            latents = initial_latents(first, self.scheduler, batch_size, generator, device)
        else:
            size = first.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            expected = (batch_size, first.config.in_channels, *size)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=first.dtype) * self.scheduler.init_noise_sigma
        self._step_index, self._callback = 0, callback_on_step_end
        if len(server_steps):
            unet = self.denoiser(client_id, "server")
            cond = server_conditioning(unet, config, client_id, cond_rows, null)
            latents = self._denoise(unet, latents, server_steps, cond, guidance_scale, generator)
        handoff = latents
        if len(client_steps):
            restart_client_chain(self.scheduler, server_steps, client_steps)
            unet = self.denoiser(client_id, "client")
            cond = client_conditioning(unet, config, cond_rows, null)
            latents = self._denoise(unet, latents, client_steps, cond, guidance_scale, generator)
        images = to_output(self.vae, latents, output_type)
        extra = ()
        if return_server_latents:
            decoded = None if output_type == "latent" else to_output(self.vae, handoff, output_type)
            extra = (handoff, decoded)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, *extra)
        return CollaFusePipelineOutput(images, *extra)

    def _check_conditioning(self, kind, class_labels, prompt, prompt_embeds, attributes) -> int:
        """ValueError for conditioning this model's kind cannot take; the number of images the
        given prompts, prompt states or attribute rows describe (None when none are given)."""
        texts = {"prompt": prompt, "prompt_embeds": prompt_embeds}
        if kind != "text" and any(v is not None for v in texts.values()):
            name = next(k for k, v in texts.items() if v is not None)
            raise ValueError(f"{name}= needs a text-conditioned model; this one's is {kind!r}")
        if kind == "class" and attributes is not None:
            raise ValueError("attributes= needs an attribute- or text-conditioned model")
        if kind == "attributes" and class_labels is not None:
            raise ValueError("class_labels= : this model is conditioned on attributes=")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt= or prompt_embeds=, not both")
        if prompt is not None:
            if not isinstance(prompt, str | list) or (
                isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)
            ):
                raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
            return 1 if isinstance(prompt, str) else len(prompt)
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise ValueError(
                    f"prompt_embeds: expected (b, tokens, width), got {tuple(prompt_embeds.shape)}"
                )
            return len(prompt_embeds)
        if attributes is not None:
            return len(attribute_rows(self.collafuse_config, attributes))
        return None

    def text_conditioner(self) -> TextConditioner:
        """The model's frozen text encoder and tokenizer (text-conditioned models)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this text-conditioned pipeline has no text_encoder/tokenizer")
        length = self.collafuse_config.get("conditioning", {}).get("max_length", 32)
        return TextConditioner(self.tokenizer, self.text_encoder, length)

    def _conditioning(
        self,
        kind,
        client_id,
        labels,
        generator,
        repeats,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        attributes,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(each image's conditioning rows, the null for guidance) for this model's kind."""
        config, device, batch = self.collafuse_config, labels.device, len(labels)

        def rows_of(values: torch.Tensor) -> torch.Tensor:
            values = values.repeat_interleave(repeats, dim=0)
            if len(values) == 1:
                values = values.expand(batch, *values.shape[1:])
            if len(values) != batch:
                raise ValueError(f"batch sizes disagree: {len(values)} conditionings, {batch}")
            return values.to(device)

        if kind == "class":
            return labels, None
        rows = None
        if attributes is not None:
            rows = rows_of(attribute_rows(config, attributes))
        elif client_entry(config, client_id).get("attribute_rates") is not None and (
            kind == "attributes" or (prompt is None and prompt_embeds is None)
        ):
            rows = draw_attributes(config, client_id, batch, generator).to(device)
        if kind == "attributes":
            return rows, torch.zeros(rows.shape[1], device=device)
        text = self.text_conditioner()
        if prompt_embeds is not None:
            states = rows_of(prompt_embeds.float())
        elif prompt is not None:
            states = rows_of(text.embed([prompt] if isinstance(prompt, str) else prompt))
        elif rows is not None:
            states = text.embed(attribute_prompts(config, rows)).to(device)
        else:
            states = text.embed(class_prompts(config, labels)).to(device)
        if negative_prompt_embeds is not None:
            null = negative_prompt_embeds.float().to(device)
        else:
            negatives = negative_prompt or ""
            null = text.embed([negatives] if isinstance(negatives, str) else negatives)
            null = null.to(device)
        if len(null) not in (1, batch):
            raise ValueError(f"negative prompts: {len(null)} for a batch of {batch}")
        return states, null if len(null) == batch else null[0]

    def _on_step(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' callback_on_step_end, counted over the whole chain."""
        index, self._step_index = self._step_index, self._step_index + 1
        if self._callback is None:
            return latents
        returned = self._callback(self, index, t, {"latents": latents}) or {}
        return returned.get("latents", latents)

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: the per-client denoisers are not diffusers components, so the offload
        hooks would never move them."""
        raise NotImplementedError(
            "CollaFusePipeline does not support enable_model_cpu_offload: its client denoisers "
            "live outside diffusers' component list; move the pipeline with .to(device)"
        )

    def _denoise(self, unet, latents, timesteps, cond, guidance_scale, generator) -> torch.Tensor:
        return denoise(
            self.scheduler,
            unet,
            latents,
            timesteps,
            cond,
            guidance_scale,
            generator,
            self.progress_bar,
            self._on_step,
        )

    # ---- save / load / publish -----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The diffusers folder plus `clients/<id>/` denoisers and `collafuse.json`."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("push_to_hub=True is not supported here: call pipe.push_to_hub")
        super().save_pretrained(save_directory, **kwargs)
        root = Path(save_directory)
        for client_id, unet in self.client_unets.items():
            unet.save_pretrained(root / CLIENTS_DIR / str(client_id), safe_serialization=True)
        (root / COLLAFUSE_CONFIG).write_text(json.dumps(self.collafuse_config, indent=2))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> CollaFusePipeline:
        """Load what `train.py` or `save_pretrained` wrote, from a local folder or a hub id."""
        root = resolve_model_folder(pretrained_model_name_or_path)
        config = read_description(root)
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")  # diffusers 0.42 asks for dtype
        unets = {int(cid): load_unet(root / CLIENTS_DIR / cid, dtype) for cid in config["clients"]}
        clients = {cid: unet for cid, unet in unets.items() if unet is not None}  # none if t_cut=0
        if (root / SERVER_DIR / "adapter_config.json").is_file():  # LoRA on a pretrained base
            kwargs.setdefault("server_unet", load_unet(root / SERVER_DIR, dtype))
        return super().from_pretrained(
            root, client_unets=clients, collafuse_config=config, **kwargs
        )

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        metrics: dict[str, Any] | None = None,
        save_directory: str | os.PathLike | None = None,
        commit_message: str = "Upload CollaFuse model",
    ) -> str:
        """Save (to `save_directory` or a temporary folder), write README.md, upload the folder.

        The model card records the cut points, the clients and their classes, the data set, the
        autoencoder's sha256 and the metrics (collafuse.json's "metrics", updated by `metrics`).
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(save_directory) if save_directory is not None else Path(tmp)
            self.save_pretrained(folder)
            (folder / "README.md").write_text(model_card(self.collafuse_config, metrics))
            return push_folder(folder, repo_id, token, private, commit_message)

    def to(self, *args: Any, **kwargs: Any) -> CollaFusePipeline:
        """Move every denoiser, the client ones included."""
        super().to(*args, **kwargs)
        for unet in self.client_unets.values():
            unet.to(*args, **kwargs)
        return self
