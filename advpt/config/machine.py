"""What this machine can run: Lightning's Trainer arguments, devices, strategy, precision, addresses."""

from __future__ import annotations

import inspect
import os
import socket
import warnings
from pathlib import Path

from omegaconf import DictConfig

from advpt.errors import UserError


def trainer_arguments() -> set[str]:
    """The keyword arguments of ``lightning.Trainer``, read from its source without importing Lightning
    (importing it takes seconds); falls back on the import if the source is not where it should be."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lightning")  # a top-level package: found, not imported
    source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py" if spec and spec.origin else None
    try:
        tree = ast.parse(source.read_text())  # type: ignore[union-attr]
        trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
        init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        names = {a.arg for a in init.args.args + init.args.kwonlyargs}
    except (OSError, AttributeError, StopIteration, SyntaxError):
        import lightning as L

        names = set(inspect.signature(L.Trainer.__init__).parameters)
    return names - {"self", "logger", "callbacks"}


def check_trainer_arguments(trainer_cfg: DictConfig) -> None:
    accepted = trainer_arguments()
    for key in trainer_cfg:
        if key not in accepted:
            raise UserError(
                f"trainer.{key} is not a Lightning Trainer argument (see lightning.Trainer's documentation)"
            )


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, as a scheduler grants it), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Loader processes per training process at most: beyond this, decoding rarely limits a GPU's step.
MAX_LOADER_WORKERS = 8
# Batches each loader process prepares ahead (PyTorch's default prefetch_factor).
PREFETCH_FACTOR = 2


def loader_workers(configured: object = None, processes: int = 1) -> int:
    """Loader processes for each of this node's ``processes`` training processes.

    ``configured`` (``data.num_workers``, evaluate's ``num_workers``) when it is a number; when it is
    null, a count sized to this machine: the cores this process may use, shared among the node's
    processes, less one in each share for the process itself, between 0 and :data:`MAX_LOADER_WORKERS`
    (Lightning's ``suggested_max_num_workers``, capped, so that it never warns of too few workers).
    """
    if configured is not None:
        return int(configured)  # type: ignore[call-overload]
    share = cpu_cores() // max(1, int(processes))
    return max(0, min(MAX_LOADER_WORKERS, share - 1))


def describe_workers(workers: int, processes: int = 1, key: str = "data.num_workers") -> str:
    """What a loader default chose, and from what: one line for the run's log."""
    count = f"{workers} loader worker{'s' if workers != 1 else ''}"
    if processes > 1:
        return (
            f"{count} per process ({key}=null: {cpu_cores()} cores shared by {processes} processes, "
            f"one kept for each, at most {MAX_LOADER_WORKERS})"
        )
    return f"{count} ({key}=null: {cpu_cores()} cores, one kept for the main process, at most {MAX_LOADER_WORKERS})"


def batch_bytes(batch_size: int, image_size: int, views: int = 1) -> int:
    """Bytes of one batch of float32 RGB images (``views`` per example), as loader processes hand it over."""
    return batch_size * views * 3 * image_size * image_size * 4


def check_shared_memory(
    workers: int,
    batch: int,
    workers_key: str = "data.num_workers",
    batch_key: str = "data.batch_size",
    chosen: bool = False,
    where: str = "/dev/shm",
) -> None:
    """One line if ``workers`` loader processes, each holding :data:`PREFETCH_FACTOR` batches of
    ``batch`` bytes, would not fit in the shared memory they hand batches over in (a container's
    default 64 MB ``/dev/shm`` ends such a run with a bus error, not a message). ``chosen``: the count
    is the machine's default, not the user's."""
    import shutil

    if workers <= 0:
        return  # the main process loads: nothing goes through shared memory
    try:
        free = shutil.disk_usage(where).free
    except OSError:  # no /dev/shm (macOS): PyTorch shares memory another way
        return
    need = workers * PREFETCH_FACTOR * batch
    if need > free:
        count = (
            f"{workers} loader processes ({workers_key}=null: this machine's default)"
            if chosen
            else f"{workers_key}={workers} loader processes"
        )
        raise UserError(
            f"{where} has {_size(free)} free, and {count} with "
            f"{PREFETCH_FACTOR} batches each in flight need about {_size(need)} there: in Docker, "
            "give the container more (docker run --shm-size=16g, or --ipc=host), or lower "
            f"{workers_key} or {batch_key}"
        )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"


def check_cpu_processes(devices: object) -> None:
    """One line if a CPU run asks for more processes than there are cores: they would only wait on
    each other (and 64 processes on 2 cores look like a hang), so nothing starts."""
    count = int(devices) if isinstance(devices, int) or str(devices).isdigit() else None
    cores = cpu_cores()
    if count is not None and count > cores:
        raise UserError(
            f"trainer.devices={count} would start {count} CPU processes on {cores} cores: use at most "
            f"trainer.devices={cores} (each process trains its share of the batch; more than the cores "
            "only wait on each other)"
        )


def _hardware() -> str:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"this machine has {os.cpu_count()} CPU cores and {gpus} GPU{'s' if gpus != 1 else ''}"


def check_environment(trainer_cfg: DictConfig) -> None:
    """Accelerator, devices, strategy and precision this machine can run, and a reachable MASTER_ADDR.

    Lightning's own checks decide (a Trainer is built and dropped; it starts no process); its
    message becomes one line with what the machine has.
    """
    import logging

    import lightning as L

    from advpt.training.sharding import strategy

    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision", "sync_batchnorm")
    kwargs = {k: trainer_cfg[k] for k in keys if k in trainer_cfg}
    shown = dict(kwargs)
    quiet = logging.getLogger("lightning.pytorch")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = L.Trainer(
                **{**kwargs, "strategy": strategy(kwargs.get("strategy", "auto"))},
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
            )
    except Exception as e:  # Lightning raises MisconfigurationException, ValueError, RuntimeError, ...
        text = " ".join(str(e).split()).split(". ")[0].rstrip(".")
        settings = ", ".join(f"trainer.{k}={v}" for k, v in shown.items() if k != "sync_batchnorm")
        raise UserError(f"{settings} cannot run here: {text}; {_hardware()}") from None
    finally:
        quiet.level = level
    from lightning.pytorch.accelerators import CPUAccelerator

    if isinstance(probe.accelerator, CPUAccelerator):  # accelerator=auto on a machine without GPUs
        check_cpu_processes(probe.num_devices)
    if (
        kwargs.get("sync_batchnorm")
        and isinstance(probe.accelerator, CPUAccelerator)
        and probe.world_size > 1
    ):
        raise UserError(
            "trainer.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not run in CPU processes "
            "(drop it on CPU; each process then normalises its own batch)"
        )
    address = os.environ.get("MASTER_ADDR")
    if address:
        try:
            socket.getaddrinfo(address, None)
        except OSError:
            raise UserError(
                f"MASTER_ADDR={address} cannot be resolved from this machine: give the first node's host "
                "name or address (or unset MASTER_ADDR for a single-node run)"
            ) from None
