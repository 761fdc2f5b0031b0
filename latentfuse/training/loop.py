"""The one training loop: every entry point runs its job through `fit`.

A job is anything with a `step`, a `train_step()` and a `save_checkpoint()`: the in-process
run's `Trainer` (every client and the server), the deployment client's `ClientJob`, the
deployment server's `ServerTrainer`, and the Flower apps, which run those two. The loop owns
what they share: the step budget, checkpoints every N steps, stopping (a signal, an operator,
a deadline) with a checkpoint, waiting while a job has nothing to train on, and the progress
bar. What differs per entry point comes in through `Hooks`.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tqdm.auto import tqdm

Outcome = Literal["finished", "stopped", "deadline"]


class Job(Protocol):
    """What `fit` drives."""

    @property
    def step(self) -> int: ...

    def train_step(self) -> dict[str, float] | float: ...

    def save_checkpoint(self) -> None: ...


@dataclass
class Hooks:
    """What an entry point adds around the steps (all optional)."""

    should_stop: Callable[[], bool] | None = None  # asked before every step (and while waiting)
    ready: Callable[[], bool] | None = None  # False: nothing to train on yet; `wait` is called
    wait: Callable[[], None] | None = None
    after_step: Callable[[int, dict[str, float]], None] | None = None  # (step, losses)
    deadline_passed: Callable[[], bool] | None = None  # the time budget (agreed over processes)


def deadline_check(deadline: float | None) -> Callable[[], bool] | None:
    """A `Hooks.deadline_passed` for a `time.monotonic()` deadline (None: no budget)."""
    if deadline is None:
        return None
    return lambda: time.monotonic() >= deadline


def _losses(value: dict[str, float] | float) -> dict[str, float]:
    return value if isinstance(value, dict) else {"loss": float(value)}


class LineStream(io.TextIOBase):
    """A stream for a progress bar written to a file or a pipe: each refresh is one line
    (a terminal redraws one line with carriage returns; a log would get them all on one)."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def fit(
    job: Job,
    max_steps: int,
    checkpoint_every: int | None = None,
    hooks: Hooks | None = None,
    desc: str = "train",
    progress: bool = True,
) -> Outcome:
    """Train `job` up to `max_steps`. With `checkpoint_every` N it checkpoints every N steps,
    at `max_steps`, and when a stop request or a passed deadline ends it early; with None the
    caller checkpoints. A step is never cut in half."""
    hooks = hooks or Hooks()
    interactive = sys.stderr.isatty()  # piped to a file: a line every 30 s, not a redrawn bar
    bar = tqdm(
        total=max_steps,
        initial=job.step,
        desc=desc,
        disable=not progress,
        file=None if interactive else LineStream(sys.stderr),
        mininterval=0.1 if interactive else 30.0,
    )
    outcome: Outcome = "finished"
    try:
        while job.step < max_steps:
            if hooks.should_stop is not None and hooks.should_stop():
                outcome = "stopped"
                break
            if hooks.deadline_passed is not None and hooks.deadline_passed():
                outcome = "deadline"
                break
            if hooks.ready is not None and not hooks.ready():
                if hooks.wait is not None:
                    hooks.wait()
                continue
            losses = _losses(job.train_step())
            shown = {k.replace("client_", "c"): f"{v:.3f}" for k, v in losses.items()}
            bar.set_postfix(shown, refresh=False)  # drawn with the update, at its interval
            bar.update(1)
            if checkpoint_every and (job.step % checkpoint_every == 0 or job.step == max_steps):
                job.save_checkpoint()
            if hooks.after_step is not None:
                hooks.after_step(job.step, losses)
    finally:
        bar.close()
    if checkpoint_every and outcome != "finished":
        job.save_checkpoint()
    return outcome
