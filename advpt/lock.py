"""One run per folder: a run holds an exclusive lock on its directory for as long as it runs.

The lock is ``flock`` on ``<run dir>/.advpt.lock``, whose text names the holder (process, host, start,
command line). The kernel drops it when the holder's process ends, however it ends (``kill -9``
included), so a lock left by a dead run never blocks; the file itself is removed by a run that ends
normally. Only the first process of a launch takes it: the other processes of a multi-process run
(its local workers, or the ranks an external launcher starts with the same command line) belong to
the same run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from advpt.errors import FolderInUse, UserError
from advpt.files import disk_fault, disk_full

LOCK_NAME = ".advpt.lock"
# The ranks an external launcher gives the processes it starts (torchrun, srun, mpirun); Lightning's
# own variables for processes created outside it (NODE_RANK, LOCAL_RANK) count too.
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "NODE_RANK", "LOCAL_RANK")

_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}  # what flock says where it does not exist

_held: dict[Path, int] = {}  # directory -> the open lock file of this process


def _forget_in_child() -> None:
    # A forked child (a data-loader worker) shares the parent's lock; closing its copy of the file
    # leaves the lock with the parent, so the run's lock ends with the run's own process.
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def first_process() -> bool:
    """Whether this process is the first of its launch (the one that speaks for the run)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value.isdigit() and int(value) != 0:
            return False
    return True


def hold(directory: Path | str, command: str, overrides: Sequence[str] = ()) -> None:
    """Lock ``directory`` (made if needed) for ``advpt COMMAND OVERRIDES``, or raise :class:`FolderInUse`
    naming the run that holds it. Taken once per process and directory; a no-op outside the launch's
    first process."""
    directory = Path(os.path.abspath(directory))  # normalised as Hydra names a job's folder
    if directory in _held or not first_process():
        return
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fault = disk_fault(e, directory)
        if fault is not None:
            raise disk_full(directory, fault) from None
        raise UserError(f"cannot create {directory} ({e.strerror or e})") from None
    try:
        fd = _lock(path, directory, command)
        if fd is None:
            print(
                f"advpt {command}: warning: {directory} cannot be locked (its file system does not "
                "support flock): a second run into it would not be refused",
                file=sys.stderr,
            )
            return
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(["advpt", command, *overrides]),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            raise
    except OSError as e:
        fault = disk_fault(e, path)
        if fault is not None:
            raise disk_full(path, fault) from None
        raise UserError(f"cannot lock {directory} for this run ({e.strerror or e})") from None
    _held[directory] = fd


def release(directory: Path | str) -> None:
    """End this process's hold on ``directory`` (removing its lock file); a no-op if it holds none."""
    directory = Path(os.path.abspath(directory))  # normalised as Hydra names a job's folder
    fd = _held.pop(directory, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):  # removed while still held: a run waiting on it looks again
        (directory / LOCK_NAME).unlink()
    os.close(fd)


def holder(directory: Path | str) -> str:
    """Who holds ``directory``, as the refusal names it (from its lock file)."""
    try:
        record = json.loads((Path(directory) / LOCK_NAME).read_text())
        return f"pid {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is just starting"


def _lock(path: Path, directory: Path, command: str) -> int | None:
    """The open lock file, exclusively locked; raises :class:`FolderInUse` if another process holds it.
    None where the file system has no flock (Lustre mounted without ``flock``, some FUSE mounts)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(
                f"{directory} is in use by another run ({holder(directory)}); wait for it to end, "
                f"or give advpt {command} another hydra.run.dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        except BaseException:
            os.close(fd)
            raise
        # Its last holder may have removed the file between our open and our lock: lock the new one.
        try:
            here, ours = os.stat(path), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
