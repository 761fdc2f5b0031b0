"""Sampling pieces shared by CollaFusePipeline and its server and client halves.

One chain: `set_timesteps(N)` once, the server runs the entries >= t_cut, the client the rest,
from the server's latents (method.md §2, Sampling).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from latentfuse.conditioning import prompt, unet_inputs
from latentfuse.data.autoencoder import Autoencoder, decode
from latentfuse.method.split import DiffusionSplit

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Keys the label stream of numpy's SeedSequence apart from anything else seeded the same way.
LABEL_STREAM = 0x1ABE1

Generators = torch.Generator | list[torch.Generator] | None
Labels = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Conditioning:
    """What one denoiser is conditioned on, and its null for classifier-free guidance."""

    # (b,) class labels or ids, (b, A) attribute vectors, (b, L, D) prompt token states; None
    # for an unconditional denoiser
    labels: torch.Tensor | None
    null: torch.Tensor | int | None  # one row (broadcast) or (b, ...) rows (negative prompts)


# ---- the model description (collafuse.json) ---------------------------------------------------
def client_entry(description: dict[str, Any], client_id: int) -> dict[str, Any]:
    """The saved description of one client (t_cut, classes); ValueError for an unknown id."""
    clients = description.get("clients", {})
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        kind = type(client_id).__name__
        raise ValueError(f"client_id must be an int, got {client_id!r} ({kind})")
    if str(client_id) not in clients:
        known = sorted(int(k) for k in clients)
        raise ValueError(f"unknown client_id {client_id!r}; this model has clients {known}")
    return clients[str(client_id)]


def num_classes(description: dict[str, Any]) -> int:
    """Number of class labels; the clients' null label is this index."""
    return len(description.get("class_names", []))


def split_schedule(
    scheduler, description: dict[str, Any], client_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(server timesteps, client timesteps) of the scheduler's current `timesteps`."""
    entry = client_entry(description, client_id)
    split = DiffusionSplit.from_scheduler(scheduler, int(entry["t_cut"]))
    return split.split_timesteps(scheduler.timesteps, entry.get("client_start"))


def conditioning_kind(description: dict[str, Any]) -> str:
    """ "class", "attributes" or "text" (models from before conditioning kinds: "class")."""
    return description.get("conditioning", {}).get("kind", "class")


def is_conditional(unet: torch.nn.Module) -> bool:
    """Whether `unet` takes any conditioning (class embedding, projection or cross-attention)."""
    config = unet.config
    if getattr(config, "cross_attention_dim", None) and "CrossAttn" in str(config.down_block_types):
        return True
    return config.num_class_embeds is not None or config.class_embed_type is not None


def client_conditioning(
    unet: UNet2DModel,
    description: dict[str, Any],
    labels: torch.Tensor,
    null: torch.Tensor | None = None,
) -> Conditioning:
    """A client denoiser sees the images' conditioning (`labels`: class labels, attribute
    vectors or token states); its null is `null`, or for class labels the index after them."""
    if not is_conditional(unet):
        return Conditioning(None, None)
    return Conditioning(labels, num_classes(description) if null is None else null)


def server_conditioning(
    unet: UNet2DModel,
    description: dict[str, Any],
    client_id: int,
    labels: torch.Tensor,
    null: torch.Tensor | None = None,
) -> Conditioning:
    """The server sees the conditioning, the client id, or nothing (`server_labels`)."""
    mode = description.get("server_labels", "class")
    if not is_conditional(unet) or mode == "none":
        return Conditioning(None, None)
    if mode == "client":
        num_clients = len(description.get("clients", {}))
        ids = torch.full((len(labels),), client_id, dtype=torch.long, device=labels.device)
        return Conditioning(ids, num_clients)
    return Conditioning(labels, num_classes(description) if null is None else null)


# ---- arguments ---------------------------------------------------------------------------------
def check_steps(num_inference_steps: int) -> None:
    """ValueError naming `num_inference_steps` unless it is an int >= 1."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")


def check_output_type(output_type: str) -> None:
    """ValueError naming `output_type` unless it is one of OUTPUT_TYPES."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_label_values(class_labels: Labels) -> None:
    """class_labels: an int, a list of ints or an integer tensor (a class index, not a name)."""
    values = class_labels if isinstance(class_labels, list | tuple) else [class_labels]
    allowed = (numbers.Integral, torch.Tensor, np.ndarray)
    strange = [v for v in values if not isinstance(v, allowed) or isinstance(v, bool)]
    if strange:
        raise ValueError(
            f"class_labels must be class indices (ints), got {strange[0]!r}; a model's class "
            "names are pipe.collafuse_config['class_names']"
        )


def resolve_batch_size(batch_size: int | None, generator: Generators, class_labels: Labels) -> int:
    """The batch size that `batch_size`, a generator list and `class_labels` agree on."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(generator, list) and not generator:
        raise ValueError("generator is an empty list")
    sizes = {"batch_size": batch_size}
    if isinstance(generator, list):
        sizes["generator list"] = len(generator)
    if class_labels is not None:
        check_label_values(class_labels)
        count = torch.as_tensor(class_labels).numel()
        if count == 0:
            raise ValueError("class_labels is empty")
        sizes["class_labels"] = count if count > 1 else None  # one label serves a batch
    given = {k: v for k, v in sizes.items() if v is not None}
    if len(set(given.values())) > 1:
        raise ValueError("batch sizes disagree: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    return next(iter(given.values()), 1)


def _label_stream(generator: torch.Generator) -> np.random.Generator:
    return np.random.default_rng([generator.initial_seed(), LABEL_STREAM])


def draw_labels(allowed: Sequence[int], batch_size: int, generator: Generators) -> torch.Tensor:
    """`batch_size` labels from `allowed`, keyed by the generators' seeds alone.

    Labels come from a stream derived from each generator's `initial_seed()`, so drawing them
    neither consumes the image generators nor touches the global RNG, and with one generator
    per image, image i gets the same label whatever the batch size. Without a generator they
    come from the global torch RNG, like the noise.
    """
    if generator is None:
        picks = torch.randint(len(allowed), (batch_size,))
    elif isinstance(generator, list):
        picks = torch.tensor([int(_label_stream(g).integers(len(allowed))) for g in generator])
    else:
        picks = torch.from_numpy(_label_stream(generator).integers(len(allowed), size=batch_size))
    return torch.tensor([int(c) for c in allowed])[picks]


def client_labels(
    description: dict[str, Any],
    client_id: int,
    class_labels: Labels,
    batch_size: int,
    generator: Generators,
) -> torch.Tensor:
    """(b,) labels: `class_labels` checked against the client's classes, or drawn from them."""
    allowed = [int(c) for c in client_entry(description, client_id)["classes"]]
    if class_labels is None:
        return draw_labels(allowed, batch_size, generator)
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
    bad = sorted({int(y) for y in labels.tolist()} - set(allowed))
    if bad:
        raise ValueError(f"class_labels {bad} are not among client {client_id}'s classes {allowed}")
    return labels.long().expand(batch_size).clone() if labels.numel() == 1 else labels.long()


# ---- the chain ---------------------------------------------------------------------------------
def start_chain(
    scheduler,
    description: dict[str, Any],
    client_id: int,
    class_labels: Labels,
    batch_size: int | None,
    num_inference_steps: int,
    generator: Generators,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the call, draw the client's labels, set the schedule once and split it.

    Returns (labels (b,), server timesteps, client timesteps); the batch size is len(labels).
    """
    check_steps(num_inference_steps)
    client_entry(description, client_id)  # an unknown client fails first
    batch_size = resolve_batch_size(batch_size, generator, class_labels)
    labels = client_labels(description, client_id, class_labels, batch_size, generator)
    scheduler.set_timesteps(num_inference_steps, device=device)
    server_steps, client_steps = split_schedule(scheduler, description, client_id)
    return labels.to(device), server_steps, client_steps


def initial_latents(
    unet: UNet2DModel, scheduler, batch_size: int, generator: Generators, device: torch.device
) -> torch.Tensor:
    """Gaussian latents times `init_noise_sigma` (call after `set_timesteps`)."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    shape = (batch_size, unet.config.in_channels, height, width)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
    return latents * scheduler.init_noise_sigma


def guided_noise(
    unet: UNet2DModel,
    model_input: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """The model output, with classifier-free guidance when `guidance_scale` != 1."""
    if cond.labels is None or cond.null is None or guidance_scale == 1.0:
        return unet(model_input, t, **unet_inputs(unet, cond.labels)).sample
    null = torch.as_tensor(cond.null, dtype=cond.labels.dtype, device=cond.labels.device)
    null = null.expand_as(cond.labels)
    doubled = torch.cat([model_input, model_input])  # (2b, c, h, w): conditional, then null
    both = unet(doubled, t, **unet_inputs(unet, torch.cat([cond.labels, null]))).sample
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def restart_client_chain(scheduler, server_steps: torch.Tensor, client_steps: torch.Tensor) -> None:
    """Under the original objective's compensation the client's part re-runs levels the
    server already ran (`DiffusionSplit.split_timesteps(client_start=...)`): point the
    scheduler's step index at the client's first entry. A multistep solver's history belongs
    to the server's chain, so those schedulers are refused."""
    if not len(server_steps) or not len(client_steps) or client_steps[0] < server_steps[-1]:
        return  # the ordinary hand-off: the chain simply continues
    if getattr(scheduler.config, "solver_order", 1) > 1:
        raise ValueError(
            f"{type(scheduler).__name__} keeps a multistep history and cannot restart the "
            "client's chain above the cut (the original objective's compensation): use ddim, "
            "ddpm or euler"
        )
    if hasattr(scheduler, "set_begin_index"):
        index = int((scheduler.timesteps > client_steps[0]).sum())
        scheduler._step_index = None  # diffusers: the next step starts at begin_index
        scheduler.set_begin_index(index)


def denoise(
    scheduler,
    unet: UNet2DModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    generator: Generators,
    progress_bar: Callable[[Iterable], Iterable] = iter,
    on_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `timesteps` of the chain with `unet`, continuing `scheduler`'s state; `on_step(t,
    latents)` after each step may replace the latents (diffusers' callback_on_step_end)."""
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if accepts_generator else {}
    for t in progress_bar(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = guided_noise(unet, model_input, t, cond, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, **extra).prev_sample
        if on_step is not None:
            latents = on_step(t, latents)
    return latents


def to_output(vae: Autoencoder, latents: torch.Tensor, output_type: str) -> Any:
    """Latents as "latent", or decoded: "pt" (b, c, h, w) in [0, 1], "np" (b, h, w, c), "pil"."""
    if output_type == "latent":
        return latents
    images = (decode(vae, latents).float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return DiffusionPipeline.numpy_to_pil(array) if output_type == "pil" else array


# ---- attribute and text conditioning -----------------------------------------------------------
def attribute_names(description: dict[str, Any]) -> list[str]:
    """The attribute names of an attribute- or text-conditioned model, in vector order."""
    return list(description.get("conditioning", {}).get("attribute_names", []))


def attribute_rows(description: dict[str, Any], attributes: Any) -> torch.Tensor:
    """`attributes` as (n, A) +-1 vectors: 0/1 rows (one row or a list of them, as in the data
    set's attribute file), or lists of attribute names (those present; the rest absent)."""
    names = attribute_names(description)
    rows = attributes
    if isinstance(rows, list | tuple) and rows and all(isinstance(a, str) for a in rows):
        rows = [rows]  # one image's names
    nested = (
        isinstance(rows, list | tuple) and rows and all(isinstance(r, list | tuple) for r in rows)
    )
    if nested and all(isinstance(a, str) for r in rows for a in r):
        unknown = sorted({a for r in rows for a in r} - set(names))
        if unknown:
            raise ValueError(
                f"attributes: unknown attribute names {unknown}; this model's are {names}"
            )
        rows = [[int(n in r) for n in names] for r in rows]
    values = torch.as_tensor(rows)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(
            f"attributes: expected rows of {len(names)} 0/1 values (or lists of attribute "
            f"names), got shape {tuple(values.shape)}"
        )
    if not torch.isin(values, torch.tensor([0, 1], dtype=values.dtype)).all():
        raise ValueError("attributes: expected 0/1 values (absent/present)")
    return values.float() * 2 - 1


def draw_attributes(
    description: dict[str, Any], client_id: int, batch_size: int, generator: Generators
) -> torch.Tensor:
    """(b, A) +-1 vectors drawn attribute by attribute from the client's recorded attribute
    rates (`attribute_rates` in collafuse.json), keyed by the generators' seeds like labels."""
    rates = client_entry(description, client_id).get("attribute_rates")
    if rates is None:
        raise ValueError(f"client {client_id} records no attribute rates: pass attributes=")
    rates = torch.tensor(rates, dtype=torch.float64)
    if generator is None:
        uniform = torch.rand(batch_size, len(rates), dtype=torch.float64)
    elif isinstance(generator, list):
        uniform = torch.stack(
            [torch.from_numpy(_label_stream(g).random(len(rates))) for g in generator]
        )
    else:
        uniform = torch.from_numpy(_label_stream(generator).random((batch_size, len(rates))))
    return (uniform < rates).float() * 2 - 1


def attribute_prompts(description: dict[str, Any], rows: torch.Tensor) -> list[str]:
    """The prompts training made of +-1 attribute rows (conditioning.prompt_template)."""
    names = attribute_names(description)
    template = description.get("conditioning", {}).get("prompt_template", "{}")
    present = ([n for n, v in zip(names, row, strict=True) if v > 0] for row in rows.tolist())
    return [prompt(words, template) for words in present]


def class_prompts(description: dict[str, Any], labels: torch.Tensor) -> list[str]:
    """The prompts training made of class labels (data sets without attributes)."""
    names = description.get("class_names", [])
    template = description.get("conditioning", {}).get("prompt_template", "{}")
    return [prompt([names[int(y)]], template) for y in labels.tolist()]


def split_conditioning(
    description: dict[str, Any],
    labels: torch.Tensor,
    conditioning: torch.Tensor | None,
    null: torch.Tensor | None,
    needed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, null) for one half of a split chain: the class labels for a class-conditioned
    model; for attributes or text the given rows (b, ...) and null, required where the half's
    denoiser reads them (`needed`)."""
    kind = conditioning_kind(description)
    if kind == "class":
        if conditioning is not None or null is not None:
            raise ValueError("conditioning= is for attribute- or text-conditioned models")
        return labels, None
    if conditioning is None or null is None:
        if needed:
            raise ValueError(
                f"this model is conditioned on {kind}: pass conditioning= (each image's rows) "
                "and null_conditioning= (the null for guidance)"
            )
        return labels, None
    if len(conditioning) != len(labels):
        raise ValueError(f"conditioning has {len(conditioning)} rows for a batch of {len(labels)}")
    device = labels.device
    return conditioning.float().to(device), null.float().to(device)
