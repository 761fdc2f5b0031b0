"""What a denoiser is conditioned on, one module for every kind (`conditioning.kind`).

Every image carries one conditioning tensor, and every kind has a null value for
classifier-free guidance (label dropout in training, the unconditional branch in sampling):

- "class": its class index (long); null: index `num_classes`; a `UNet2DModel` with a class
  embedding;
- "attributes": its binary attributes as +-1 (float, (A,)); null: zeros (no attribute known);
  a `UNet2DConditionModel` with `class_embed_type="projection"`;
- "text": its prompt's token states (float, (L, D)); null: the empty prompt's states; a
  `UNet2DConditionModel` with cross-attention.

A prompt is made from the image's attribute names (CelebA: "Male, Smiling, Young"; AwA2:
its class's predicates) or else its class name, put into `conditioning.prompt_template`; the
frozen transformers text encoder (CLIP or T5, `conditioning.text_encoder`) turns it into token
states once, when the run is built, so releases and batches carry tensors of fixed shape.

What the server receives follows `server_labels`: "class" sends each release's conditioning
tensor (for text: the prompt's token states, from which anyone holding the public encoder can
read the prompt back, so the prompt counts as disclosed); "client" only the client id; "none"
nothing, and the server's denoiser is unconditional (its sampling steps run unconditioned).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from latentfuse.config import RunConfig, UNetConfig
from latentfuse.data.datasets import ImageDataset

KINDS = ("class", "attributes", "text")
TEXT_FOLDERS = ("tokenizer", "text_encoder")  # the diffusers layout of a model folder


# ---- per-image conditioning --------------------------------------------------------------------
def attribute_vectors(attributes: torch.Tensor | Any) -> torch.Tensor:
    """Binary attributes (n, A) in {0, 1} as the +-1 float vectors the denoisers read."""
    values = torch.as_tensor(attributes)
    if values.ndim != 2:
        raise ValueError(f"attributes: expected (n, num_attributes), got {tuple(values.shape)}")
    if not torch.isin(values, torch.tensor([0, 1], dtype=values.dtype)).all():
        raise ValueError("attributes: expected 0/1 values (an attribute absent or present)")
    return values.float() * 2 - 1


def prompt(words: list[str], template: str = "{}") -> str:
    """A prompt as training makes it: the words (attribute or class names, underscores as
    spaces) comma separated, in `template`."""
    return template.format(", ".join(w.replace("_", " ") for w in words))


def image_prompts(dataset: ImageDataset, indices: list[int], template: str = "{}") -> list[str]:
    """The prompt of each image: its present attributes' names, or its class name when the
    data set has no attributes (`prompt`)."""
    names = dataset.attribute_names
    prompts = []
    for i in indices:
        record = dataset.records[i]
        if names and record.attributes is not None:
            words = [n for n, v in zip(names, record.attributes, strict=True) if v]
        else:
            words = [dataset.class_names[record.label]]
        prompts.append(prompt(words, template))
    return prompts


# ---- text ------------------------------------------------------------------------------------
class TextConditioner:
    """A frozen transformers text encoder and its tokenizer: prompts -> token states."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_length: int = 32):
        self.tokenizer, self.text_encoder, self.max_length = tokenizer, text_encoder, max_length
        self.text_encoder.requires_grad_(False).eval()

    @classmethod
    def load(cls, source: str | Path, max_length: int = 32) -> TextConditioner:
        """From a folder holding `tokenizer/` and `text_encoder/` (a diffusers model folder or
        a run's export), or from one transformers checkpoint folder or hub id holding both."""
        from transformers import AutoTokenizer

        from latentfuse.paths import check_model_path

        source = str(source)
        check_model_path(source, "conditioning.text_encoder")
        folder = Path(source).expanduser()
        if folder.is_dir() and all((folder / name).is_dir() for name in TEXT_FOLDERS):
            tokenizer_path, encoder_path = folder / "tokenizer", folder / "text_encoder"
        else:
            tokenizer_path = encoder_path = source
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        return cls(tokenizer, load_text_encoder(encoder_path), max_length)

    @property
    def hidden_size(self) -> int:
        """The width D of the token states (the denoisers' cross_attention_dim)."""
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def embed(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Token states (n, max_length, D) of `prompts` (padded and truncated to max_length)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a list of strings, got {prompts!r}")
        device = next(self.text_encoder.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            states = self.text_encoder(tokens.input_ids.to(device)).last_hidden_state
            out.append(states.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.max_length, self.hidden_size)

    def save(self, folder: str | Path) -> None:
        """Write `folder/tokenizer` and `folder/text_encoder` (the diffusers layout)."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.text_encoder.save_pretrained(str(folder / "text_encoder"))


def text_encoder_folder(source: str | Path) -> str:
    """Where the text encoder's own config lies: `source/text_encoder` in a model folder's
    layout, else `source` (one transformers checkpoint folder or hub id)."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir() and all((folder / name).is_dir() for name in TEXT_FOLDERS):
        return str(folder / "text_encoder")
    return str(source)


def text_width(source: str | Path) -> int:
    """The width D of a text encoder's token states, from its config alone (no weights): what
    a server that only checks and trains on token states needs to know of the encoder."""
    from transformers import AutoConfig

    from latentfuse.paths import check_model_path

    check_model_path(str(source), "conditioning.text_encoder")
    config = AutoConfig.from_pretrained(text_encoder_folder(source))
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not width and hasattr(config, "text_config"):
        width = config.text_config.hidden_size
    if not width:
        raise ValueError(f"conditioning.text_encoder: {source} records no hidden size")
    return int(width)


def load_text_encoder(source: str | Path) -> torch.nn.Module:
    """A CLIP text model or a T5 encoder, by the checkpoint's own config."""
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    config = AutoConfig.from_pretrained(str(source))
    kind = config.model_type
    if kind in ("clip", "clip_text_model"):
        return CLIPTextModel.from_pretrained(str(source))
    if kind in ("t5", "umt5", "mt5"):
        return T5EncoderModel.from_pretrained(str(source))
    raise ValueError(
        f"conditioning.text_encoder: {source} is a {kind!r} model; expected a CLIP text model "
        "or a T5 encoder"
    )


def load_text(config: RunConfig) -> TextConditioner | None:
    """The frozen text encoder of a text-conditioned run (None for the other kinds)."""
    from latentfuse.paths import resolve_path

    if config.conditioning.kind != "text":
        return None
    conditioning = config.conditioning
    return TextConditioner.load(resolve_path(conditioning.text_encoder), conditioning.max_length)


# ---- null values and denoiser inputs ---------------------------------------------------------
def null_condition(
    kind: str,
    *,
    num_classes: int = 0,
    num_attributes: int = 0,
    text: TextConditioner | None = None,
) -> torch.Tensor:
    """The null conditioning of one image (broadcast over a batch when assigned to rows)."""
    if kind == "class":
        return torch.tensor(num_classes, dtype=torch.long)
    if kind == "attributes":
        return torch.zeros(num_attributes)
    if kind == "text":
        if text is None:
            raise ValueError("a text conditioning needs its text encoder for the empty prompt")
        return text.embed([""])[0]
    raise ValueError(f"conditioning kind must be one of {KINDS}, got {kind!r}")


def unet_inputs(unet: torch.nn.Module, cond: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments that feed `cond` (b, ...) to `unet`: class labels to a
    UNet2DModel, a projected vector or cross-attention states to a UNet2DConditionModel."""
    if isinstance(unet, UNet2DConditionModel):
        if cond is not None and cond.ndim == 3:
            return {"encoder_hidden_states": cond.to(unet.dtype)}
        labels = None if cond is None else cond.to(unet.dtype)
        return {"encoder_hidden_states": None, "class_labels": labels}
    return {"class_labels": cond}


def build_denoiser(
    cfg: UNetConfig,
    kind: str,
    sample_size: int,
    channels: int,
    *,
    num_class_embeds: int | None = None,
    num_attributes: int = 0,
    cross_attention_dim: int = 0,
) -> torch.nn.Module:
    """The denoiser for one conditioning kind: `UNet2DModel` for class labels (or none: the
    server under server_labels "client"/"none" passes kind "class"), `UNet2DConditionModel`
    with a projection embedding for attributes, with cross-attention for text."""
    from latentfuse.models import build_unet

    if kind == "class":
        return build_unet(cfg, sample_size, channels, num_class_embeds)
    depth = len(cfg.block_out_channels)
    common = {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
    }
    if kind == "attributes":
        if num_attributes < 1:
            raise ValueError("an attribute-conditioned denoiser needs num_attributes >= 1")
        down = ["DownBlock2D"] * depth
        if cfg.attention:
            down[-1] = "AttnDownBlock2D"
        return UNet2DConditionModel(
            **common,
            down_block_types=tuple(down),
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            mid_block_type="UNetMidBlock2D",
            class_embed_type="projection",
            projection_class_embeddings_input_dim=num_attributes,
            cross_attention_dim=cfg.block_out_channels[-1],  # unused: no cross-attention
        )
    if kind == "text":
        if cross_attention_dim < 1:
            raise ValueError("a text-conditioned denoiser needs the text encoder's width")
        down = (
            ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (depth - 1)
            if depth > 1
            else ["CrossAttnDownBlock2D"]
        )
        return UNet2DConditionModel(
            **common,
            down_block_types=tuple(down),
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
        )
    raise ValueError(f"conditioning kind must be one of {KINDS}, got {kind!r}")
