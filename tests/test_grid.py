"""experiments/grid.py: one output folder per grid, points claimed by file locks so several
jobs share a grid, and results kept under the key of what made them."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.grid import claim, grid_folder, keyed, walk

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.subprocess
def test_a_claim_excludes_other_processes_until_released_or_dead(tmp_path):
    import subprocess

    from experiments.grid import claim

    folder = tmp_path / "point"
    hold = (
        "import sys, time; from pathlib import Path; from experiments.grid import claim; "
        "c = claim(Path(sys.argv[1])); print('held' if c else 'busy', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert claim(folder) is None  # a live holder
    finally:
        holder.kill()  # as kill -9 would: the lock goes with the process
        holder.wait()
    mine = claim(folder)
    assert mine is not None
    assert claim(tmp_path / "other") is not None
    mine.release()
    with claim(folder) as again:
        assert again is not None


def test_walk_skips_a_point_another_job_holds_or_takes_it_last_once_free(tmp_path):
    points = ["a", "b", "c"]
    done: list[str] = []
    held = claim(tmp_path / "b")
    walk(points, lambda p: tmp_path / p, done.append)
    assert done == ["a", "c"]  # b belongs to the other job
    done.clear()
    timer = threading.Timer(0.3, held.release)
    timer.start()
    started = time.monotonic()
    walk(points, lambda p: tmp_path / p, done.append, wait=True)
    assert done == ["a", "c", "b"]  # b taken after the others, once its holder let go
    assert time.monotonic() - started >= 0.25
    timer.join()


def test_keyed_reuses_a_result_only_under_the_same_key(tmp_path):
    path, calls = tmp_path / "result.json", []

    def compute() -> dict:
        calls.append(1)
        return {"value": len(calls)}

    assert keyed(path, {"steps": 10}, compute) == {"value": 1}
    assert keyed(path, {"steps": 10}, compute) == {"value": 1} and len(calls) == 1
    assert keyed(path, {"steps": 20}, compute) == {"value": 2}  # what made it changed
    assert json.loads(path.read_text()) == {"key": {"steps": 20}, "value": 2}


def test_a_grid_folder_holding_results_is_continued_only_with_resume(tmp_path):
    assert grid_folder(tmp_path / "new", False, "sweep") == tmp_path / "new"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "point").mkdir()
    with pytest.raises(FileExistsError, match="already holds a sweep: pass --resume"):
        grid_folder(tmp_path / "old", False, "sweep")
    assert grid_folder(tmp_path / "old", True, "sweep") == tmp_path / "old"


def test_walk_leaves_finished_points_untouched(tmp_path):
    done: list[str] = []
    walk(["a", "b"], lambda p: tmp_path / p, done.append, done=lambda p: p == "a")
    assert done == ["b"] and not (tmp_path / "a").exists()  # no folder, no lock for "a"
