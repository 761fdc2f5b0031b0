"""latentfuse: collaborative latent diffusion (CollaFuse in latent space)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["CollaFusePipeline", "__version__"]


def __getattr__(name: str):
    # Lazy: `import latentfuse` stays cheap; the pipeline pulls in diffusers on first use.
    if name == "CollaFusePipeline":
        from latentfuse.pipelines import CollaFusePipeline

        return CollaFusePipeline
    raise AttributeError(f"module 'latentfuse' has no attribute {name!r}")
