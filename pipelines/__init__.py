"""diffusers pipelines of latentfuse (installed as `latentfuse.pipelines`)."""

from .pipeline_collafuse import CollaFusePipeline

__all__ = ["CollaFusePipeline"]
