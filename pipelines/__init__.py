"""diffusers pipelines of latentfuse (installed as `latentfuse.pipelines`)."""

from .handoff import HandOff, SolverState
from .pipeline_collafuse import CollaFusePipeline, CollaFusePipelineOutput
from .pipeline_collafuse_client import CollaFuseClientPipeline
from .pipeline_collafuse_server import CollaFuseServerPipeline

__all__ = [
    "CollaFuseClientPipeline",
    "CollaFusePipeline",
    "CollaFusePipelineOutput",
    "CollaFuseServerPipeline",
    "HandOff",
    "SolverState",
]
