"""Evaluation: sample quality (FID, KID, FCD), what releases disclose, and client burden."""

from __future__ import annotations

from latentfuse.evaluation.burden import client_burden, count_flops
from latentfuse.evaluation.disclosure import (
    ddim_reconstruct,
    decode_latents,
    reconstruction_attack,
    reidentification,
    release_fid,
    ssim,
)
from latentfuse.evaluation.evaluate import (
    EvaluationSettings,
    evaluate_model,
    model_partition,
    write_results,
)
from latentfuse.evaluation.features import (
    ClipExtractor,
    InceptionExtractor,
    default_inception_path,
    extract_features,
    load_clip,
    to_uint8,
)
from latentfuse.evaluation.generate import generate_images, sample_labels, sample_seed
from latentfuse.evaluation.metrics import (
    FeatureStats,
    distribution_scores,
    frechet_distance,
    kernel_distance,
)
from latentfuse.evaluation.reference import cached_reference_stats, load_real_images
from latentfuse.method.privacy import (
    analytic_gaussian_epsilon,
    classical_gaussian_epsilon,
    clip_latent_norm,
    gaussian_delta,
    release_privacy,
)

__all__ = [
    "ClipExtractor",
    "EvaluationSettings",
    "FeatureStats",
    "InceptionExtractor",
    "analytic_gaussian_epsilon",
    "cached_reference_stats",
    "classical_gaussian_epsilon",
    "client_burden",
    "clip_latent_norm",
    "count_flops",
    "ddim_reconstruct",
    "decode_latents",
    "default_inception_path",
    "distribution_scores",
    "evaluate_model",
    "extract_features",
    "frechet_distance",
    "gaussian_delta",
    "generate_images",
    "kernel_distance",
    "load_clip",
    "load_real_images",
    "model_partition",
    "reconstruction_attack",
    "reidentification",
    "release_fid",
    "release_privacy",
    "sample_labels",
    "sample_seed",
    "ssim",
    "to_uint8",
    "write_results",
]
