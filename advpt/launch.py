"""How a run's processes start and stop: local DDP workers and pre-emption.

Lightning's launcher re-executes ``sys.argv`` once per extra device. Under the ``advpt`` console
command that line is not a runnable script, and under a Hydra sweep it is the whole sweep, not the
job. So the first process of a node starts the node's other workers itself, each running
``python -m advpt.launch COMMAND RUN_DIR`` on the job's resolved ``config.yaml``, with the
environment Lightning reads when processes are created outside it (as torchrun and srun do);
Lightning then launches nothing and joins them into one process group.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Variables the worker environment sets; restored afterwards so the next job of a sweep starts clean.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
PREEMPTED_EXIT = 143  # what a process stopped by SIGTERM conventionally returns


class Preempted(Exception):
    """A run stopped by SIGTERM / SIGUSR1 after saving ``checkpoints/last.ckpt``."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"stopped at step {step}: {run_dir / 'checkpoints' / 'last.ckpt'} saved")
        self.run_dir, self.step = run_dir, step


# -- processes -----------------------------------------------------------------------------------
def _worker_command(command: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "advpt.launch", command, str(run_dir)]


@contextlib.contextmanager
def processes(trainer: Any, command: str, run_dir: Path) -> Iterator[None]:
    """Run the body (``trainer.fit``) as this node's first process, with the node's other workers
    started beside it when Lightning would have re-executed the command line; SIGUSR1 is taken as
    SIGTERM; a run stopped by either leaves ``last.ckpt`` and raises :class:`Preempted`."""
    from lightning.fabric.strategies.launchers.subprocess_script import _launch_process_observer
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    strategy = trainer.strategy
    launcher, env = strategy.launcher, getattr(strategy, "cluster_environment", None)
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    children: list[subprocess.Popen] = []
    own_group = (  # this process sets up the group: nobody outside started the processes
        isinstance(launcher, _SubprocessScriptLauncher)
        and env is not None
        and not env.creates_processes_externally
        and launcher.num_processes * launcher.num_nodes > 1
    )
    if own_group:
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK="0",
            WORLD_SIZE=str(launcher.num_processes * launcher.num_nodes),
        )
        for local_rank in range(1, launcher.num_processes):
            worker_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            children.append(subprocess.Popen(_worker_command(command, run_dir), env=worker_env))
        launcher.procs = children  # Lightning forwards SIGTERM / Ctrl-C to these
        _launch_process_observer(children)  # a worker that dies takes the run down with it

    previous = signal.getsignal(signal.SIGUSR1)
    # SLURM's pre-emption / time-limit warning is SIGUSR1: stop as on SIGTERM (Lightning's flag).
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield
        for child in children:
            if child.wait() != 0:
                raise RuntimeError(f"a worker process exited with code {child.returncode}")
    except SIGTERMException:
        for child in children:
            child.wait()
        raise Preempted(run_dir, trainer.global_step) from None
    except BaseException:
        for child in children:  # a worker left waiting in a collective would hang until its timeout
            child.kill()
        raise
    finally:
        signal.signal(signal.SIGUSR1, previous)
        if own_group:  # the next job of a sweep starts its own group with its own workers
            leave_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker(command: str, run_dir: str) -> None:
    """A node's extra worker: the job's resolved config, the job's directory, the same ``fit``."""
    from omegaconf import OmegaConf

    from advpt.commands import COMMANDS

    directory = Path(run_dir)
    job = importlib.import_module(COMMANDS[command].module)
    try:
        job.fit(OmegaConf.load(directory / "config.yaml"), directory)
    except Preempted:
        sys.exit(PREEMPTED_EXIT)
    finally:
        leave_group()


def leave_group() -> None:
    """Destroy this process's default process group, if it has one: what torch asks of every training
    process before it exits. A worker that exits with its gloo group alive leaves gloo's threads to be
    torn down during interpreter finalisation, where they can hang waiting for the GIL. The first
    process would then wait on it for ever."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
