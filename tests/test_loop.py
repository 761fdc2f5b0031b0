"""The one training loop (latentfuse/training/loop.py): budget, checkpoints, stopping, waiting."""

from __future__ import annotations

import pytest

from latentfuse.training.loop import Hooks, deadline_check, fit


class Counter:
    """A job whose step is a counter; it records when it checkpoints."""

    def __init__(self, step: int = 0):
        self.step, self.checkpoints = step, []

    def train_step(self) -> dict[str, float]:
        self.step += 1
        return {"loss": 1.0 / self.step}

    def save_checkpoint(self) -> None:
        self.checkpoints.append(self.step)


@pytest.mark.parametrize(
    ("every", "start", "expected"),
    [(None, 0, []), (3, 0, [3, 6, 7]), (3, 5, [6, 7]), (10, 0, [7])],
)
def test_checkpoints_every_n_steps_and_at_the_end(every, start, expected):
    job = Counter(start)
    assert fit(job, 7, every, progress=False) == "finished"
    assert job.step == 7 and job.checkpoints == expected


def test_a_stop_request_ends_after_a_whole_step_with_a_checkpoint():
    job = Counter()
    hooks = Hooks(should_stop=lambda: job.step >= 4)
    assert fit(job, 100, 50, hooks, progress=False) == "stopped"
    assert job.step == 4 and job.checkpoints == [4]


def test_a_passed_deadline_stops_at_once_with_a_checkpoint():
    job = Counter()
    assert fit(job, 100, 10, Hooks(deadline_passed=deadline_check(0.0)), progress=False) == (
        "deadline"
    )
    assert job.step == 0 and job.checkpoints == [0]
    assert deadline_check(None) is None


def test_a_job_with_nothing_to_train_on_waits_and_then_trains():
    job, waits, seen = Counter(), [], []
    hooks = Hooks(
        ready=lambda: len(waits) >= 3,
        wait=lambda: waits.append(1),
        after_step=lambda step, losses: seen.append((step, losses["loss"])),
    )
    assert fit(job, 2, None, hooks, progress=False) == "finished"
    assert len(waits) == 3 and seen == [(1, 1.0), (2, 0.5)] and job.checkpoints == []


def test_a_float_loss_is_reported_under_loss():
    class Scalar(Counter):
        def train_step(self) -> float:
            super().train_step()
            return 0.25

    seen = []
    fit(Scalar(), 1, None, Hooks(after_step=lambda s, losses: seen.append(losses)), progress=False)
    assert seen == [{"loss": 0.25}]


def test_progress_to_a_file_is_lines_not_one_redrawn_line(capsys):
    """Piped to a log (pytest captures stderr: not a terminal), the bar writes whole lines, at
    most every 30 s: no carriage returns run a whole session into one line."""
    job = Counter()
    assert fit(job, 500, None, desc="train") == "finished"
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("train: 100%")  # not 500 redraws
