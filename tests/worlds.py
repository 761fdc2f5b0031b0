"""A tiny world shared by the tests that train: noise images in 4 classes and a tiny VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentfuse.config import RunConfig, load_config

IMAGES_PER_CLASS = 12


def make_tiny_world(root: Path) -> dict[str, Path]:
    """Write a 4-class ImageFolder of 32x32 images and a tiny random AutoencoderKL under root."""
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = root / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        layers_per_block=1,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(root / "vae")
    return {"images": root / "images", "vae": root / "vae", "cache": root / "cache"}


def tiny_config(world: dict[str, Path], *overrides: str) -> RunConfig:
    """A 2-client run over the tiny world with tiny UNets; `overrides` win."""
    base = [
        f'vae="{world["vae"]}"',
        f'data.source="{world["images"]}"',
        'data.subfolder=""',
        "data.num_clients=2",
        "server_unet.block_out_channels=[32]",
        "client_unet.block_out_channels=[32]",
        "train.server_batch_size=8",
        "train.client_batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.num_preview_images=2",
        "train.preview_inference_steps=4",
        "split.t_cut=100",
    ]
    return load_config(None, base + list(overrides))


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIPVisionModelWithProjection saved as a local folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


TEXT_WORDS = [
    "a",
    "photo",
    "of",
    "face",
    "with",
    "and",
    "man",
    "woman",
    "smiling",
    "young",
    "eyeglasses",
    "hat",
    "male",
]


def tiny_clip_text(folder: Path) -> Path:
    """A randomly initialised CLIPTextModel and a CLIPTokenizer with a character-level
    vocabulary (no merges), saved together as a local folder."""
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.'-")
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    """A randomly initialised T5EncoderModel and a word-level fast tokenizer (built with the
    `tokenizers` library, T5's special tokens), saved together as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in [*TEXT_WORDS, ",", *(a.lower() for a in ("Bangs", "Bald", "Blond", "Hair"))]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)
    return folder
