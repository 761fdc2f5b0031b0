"""diffusers pipelines of latentfuse (installed as `latentfuse.pipelines`)."""

from latentfuse.pipelines.handoff import HandOff, SolverState
from latentfuse.pipelines.pipeline_collafuse import CollaFusePipeline, CollaFusePipelineOutput
from latentfuse.pipelines.pipeline_collafuse_client import CollaFuseClientPipeline
from latentfuse.pipelines.pipeline_collafuse_server import CollaFuseServerPipeline

__all__ = [
    "CollaFuseClientPipeline",
    "CollaFusePipeline",
    "CollaFusePipelineOutput",
    "CollaFuseServerPipeline",
    "HandOff",
    "SolverState",
]
