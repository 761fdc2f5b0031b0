"""What the server hands a client mid-chain: latents, where the chain stands, the solver state.

Plain tensors plus JSON (`to_tensors` / `from_tensors`), so a transport can carry it as
safetensors bytes and a JSON header; nothing is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

HANDOFF_FORMAT = 1


@dataclass(frozen=True)
class SolverState:
    """A multistep solver's memory (DPM-Solver's `model_outputs` and `lower_order_nums`)."""

    model_outputs: tuple[torch.Tensor | None, ...]  # oldest first, each (b, c, h, w) or None
    lower_order_nums: int

    @classmethod
    def capture(cls, scheduler) -> SolverState | None:
        """The state of `scheduler` after its last step; None for single-step schedulers."""
        if not hasattr(scheduler, "model_outputs") or not hasattr(scheduler, "lower_order_nums"):
            return None
        outputs = tuple(None if m is None else m.detach().clone() for m in scheduler.model_outputs)
        return cls(outputs, int(scheduler.lower_order_nums))

    def restore(self, scheduler) -> None:
        """Load this state into `scheduler` (after its `set_timesteps`)."""
        if not hasattr(scheduler, "model_outputs"):
            raise ValueError(f"{type(scheduler).__name__} is not a multistep solver: no state")
        if len(self.model_outputs) != len(scheduler.model_outputs):
            raise ValueError(
                f"solver state holds {len(self.model_outputs)} model outputs, the scheduler "
                f"keeps {len(scheduler.model_outputs)} (solver_order differs?)"
            )
        device = scheduler.timesteps.device
        scheduler.model_outputs = [None if m is None else m.to(device) for m in self.model_outputs]
        scheduler.lower_order_nums = self.lower_order_nums


@dataclass(frozen=True)
class HandOff:
    """The chain at the cut: the client continues at `timesteps[step_index]` of `set_timesteps`."""

    latents: torch.Tensor  # (b, c, h, w), the latents before the client's first step
    labels: torch.Tensor  # (b,) the client's class labels
    client_id: int
    num_inference_steps: int
    step_index: int  # index of the client's first step in the N-step schedule
    timesteps: torch.Tensor  # the client's timesteps (the schedule's entries from step_index)
    solver_state: SolverState | None = None

    def __post_init__(self) -> None:
        if self.latents.ndim != 4:
            raise ValueError(f"latents must be (b, c, h, w), got shape {tuple(self.latents.shape)}")
        if self.labels.shape != (self.latents.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.latents.shape[0]},), got {tuple(self.labels.shape)}"
            )
        if not 0 <= self.step_index <= self.num_inference_steps:
            raise ValueError(
                f"step_index must lie in [0, {self.num_inference_steps}], got {self.step_index}"
            )

    def without_solver_state(self) -> HandOff:
        """The same hand-off minus the solver state (the client restarts the solver order)."""
        return HandOff(
            self.latents,
            self.labels,
            self.client_id,
            self.num_inference_steps,
            self.step_index,
            self.timesteps,
        )

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): what a transport sends."""
        tensors = {
            "latents": self.latents.detach().cpu().contiguous(),
            "labels": self.labels.detach().cpu().contiguous(),
            "timesteps": self.timesteps.detach().cpu().contiguous(),
        }
        meta: dict[str, Any] = {
            "format": HANDOFF_FORMAT,
            "client_id": self.client_id,
            "num_inference_steps": self.num_inference_steps,
            "step_index": self.step_index,
            "solver_state": None,
        }
        if self.solver_state is not None:
            outputs = self.solver_state.model_outputs
            for i, m in enumerate(outputs):
                if m is not None:
                    tensors[f"solver.model_outputs.{i}"] = m.detach().cpu().contiguous()
            meta["solver_state"] = {
                "num_model_outputs": len(outputs),
                "lower_order_nums": self.solver_state.lower_order_nums,
            }
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> HandOff:
        """Inverse of `to_tensors`."""
        if meta.get("format") != HANDOFF_FORMAT:
            raise ValueError(f"hand-off format must be {HANDOFF_FORMAT}, got {meta.get('format')}")
        missing = {"latents", "labels", "timesteps"} - tensors.keys()
        if missing:
            raise ValueError(f"hand-off tensors lack {sorted(missing)}")
        state = None
        if meta.get("solver_state") is not None:
            count = int(meta["solver_state"]["num_model_outputs"])
            outputs = tuple(tensors.get(f"solver.model_outputs.{i}") for i in range(count))
            state = SolverState(outputs, int(meta["solver_state"]["lower_order_nums"]))
        return cls(
            tensors["latents"],
            tensors["labels"].long(),
            int(meta["client_id"]),
            int(meta["num_inference_steps"]),
            int(meta["step_index"]),
            tensors["timesteps"],
            state,
        )
