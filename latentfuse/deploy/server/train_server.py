r"""The deployment server's trainer as its own process (any number, under `accelerate launch`).

    accelerate launch --num_processes 2 -m latentfuse.deploy.server.train_server \
        --config configs/deploy.toml --state-dir deploy/server

It reads the releases `latentfuse serve` committed to `<state-dir>/releases.db`, trains, and
publishes weights to `<state-dir>/published/`, which the front reloads for sampling without a
restart. It resumes from `<state-dir>/checkpoint/`; SIGTERM or SIGINT checkpoint and stop it.
`latentfuse serve --trainer-processes N` starts it for you.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from latentfuse.deploy.config import load_deploy_config
from latentfuse.deploy.server.trainer import ServerTrainer


def trainer_command(
    config: str | Path,
    state_dir: str | Path,
    processes: int = 1,
    overrides: Sequence[str] = (),
    init_from: str | None = None,
    mixed_precision: str = "no",
) -> list[str]:
    """The command that starts the trainer under `accelerate launch` with `processes`
    processes (DDP for more than one; on a machine without GPUs, CPU processes)."""
    if processes < 1:
        raise ValueError(f"--trainer-processes must be >= 1, got {processes}")
    module = ["-m", "latentfuse.deploy.server.train_server"]
    args = ["--config", str(config), "--state-dir", str(state_dir)]
    args += ["--init-from", str(init_from)] if init_from else []
    launcher = ["-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", mixed_precision]
    launcher += ["--dynamo_backend", "no"]
    if processes > 1:
        launcher += ["--multi_gpu"]  # CPU DDP where there is no GPU: trainer_environment
    return [sys.executable, *launcher, *module, *args, *overrides]


def trainer_environment() -> dict[str, str]:
    """The trainer's environment: this one, with Accelerate told to use CPU processes where
    there is no GPU (`--multi_gpu` then means gloo DDP on the CPU)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def build_parser() -> argparse.ArgumentParser:
    """The trainer's arguments."""
    p = argparse.ArgumentParser(
        prog="latentfuse.deploy.server.train_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="TOML run config with a [deploy] table")
    p.add_argument("--state-dir", required=True, help="the state folder `latentfuse serve` uses")
    p.add_argument("--init-from", help="model folder whose server_unet weights to start from")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train until `train.max_steps` or a signal; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch: one process reports
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    try:
        config, deploy = load_deploy_config(args.config, args.overrides)
        trainer = ServerTrainer(config, deploy, args.state_dir, init_from=args.init_from)
    except (ValueError, FileNotFoundError) as error:
        print(f"latentfuse.deploy.server.train_server: error: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    front = os.environ.get(FRONT_PID)
    if front:  # started by `latentfuse serve`: stop when the front is gone (kill -9 included)
        threading.Thread(target=watch_front, args=(int(front), stop), daemon=True).start()
    try:
        held = hold_trainer_lock(Path(args.state_dir), rank)
    except TimeoutError as error:
        print(f"latentfuse.deploy.server.train_server: error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.load_checkpoint()
        trainer.run(stop)
    finally:
        if held is not None:
            os.close(held)
    return 1 if trainer.state.startswith("failed") else 0


FRONT_PID = "LATENTFUSE_FRONT_PID"  # set by the front that starts the trainer
TRAINER_LOCK = "trainer.lock"


def watch_front(pid: int, stop: threading.Event, every: float = 1.0) -> None:
    """Set `stop` once process `pid` (the front) no longer exists: a trainer outliving its
    front would train beside the next front's trainer."""
    while not stop.wait(every):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logging.getLogger(__name__).warning("the front (pid %d) is gone: stopping", pid)
            stop.set()
        except PermissionError:
            pass  # it exists, under another user


def hold_trainer_lock(state_dir: Path, rank: int, timeout: float = 120.0) -> int | None:
    """One trainer per state folder: rank 0 holds an exclusive flock on `trainer.lock`,
    waiting up to `timeout` seconds for a trainer that is still stopping. The descriptor (the
    lock goes with it, or with the process); None on other ranks."""
    if rank != 0:
        return None
    fd = os.open(state_dir / TRAINER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"another trainer holds {state_dir / TRAINER_LOCK}: one trainer per state "
                    "folder (stop it, or give this one another --state-dir)"
                ) from None
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
