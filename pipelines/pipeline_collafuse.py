"""CollaFusePipeline for diffusers' community-pipeline loader: the code lives in the package
(`latentfuse/pipelines/`); this file lets `DiffusionPipeline.from_pretrained(folder,
custom_pipeline="pipelines/pipeline_collafuse.py", trust_remote_code=True)` find it."""

from latentfuse.pipelines.pipeline_collafuse import CollaFusePipeline

__all__ = ["CollaFusePipeline"]
