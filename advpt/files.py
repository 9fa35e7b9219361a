"""Writing a file so that no reader ever sees half of it: write beside it, then ``os.replace``.

A run can be killed at any moment (pre-emption, Ctrl-C) while another process (``latest``, a study,
the report) reads the same folder; the rename is atomic on every POSIX file system. A disk that
fills up (or is read-only) mid-write leaves the previous file and no temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from advpt.errors import DiskFull

# What a write meets when the disk, not the data, is at fault.
DISK_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed onto ``path`` when the block ends, removed
    if it raises. Its name is unique to this process and call, and hidden (a leading dot). A disk that
    is full, over quota or read-only is raised as :class:`DiskFull`: one line, ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        # The mode a plain open() would give: some writers (safetensors) create their file 0600,
        # which would keep a run's weights from the collaborators who share its folder.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        fault = None if isinstance(e, DiskFull) else disk_fault(e, tmp)  # looked at while tmp fills the disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if fault is not None:
            raise disk_full(path, fault) from e
        raise


def disk_fault(error: BaseException, path: Path | str | None = None) -> int | None:
    """The errno (ENOSPC, EDQUOT, EROFS) if ``error``, or an error it came from, is the disk's fault.

    Writers outside Python's io (torch's zip writer, safetensors) say so in words, or not at all
    (torch: "unexpected pos"): then a file system at ``path`` that is read-only or has no byte left
    for this user is the answer.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FAULTS:
            return cause.errno
        text = str(cause)
        for code in DISK_FAULTS:
            if os.strerror(code) in text or f"(os error {code})" in text:
                return code
        cause = cause.__cause__ or cause.__context__
    if path is None or not isinstance(error, OSError | RuntimeError):
        return None
    try:
        stat = os.statvfs(_existing(Path(path)))
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    return errno.ENOSPC if stat.f_bavail == 0 else None


def disk_full(path: Path | str, fault: int) -> DiskFull:
    """The one line for a file that its disk refused: the file, why, and the space left where it goes."""
    where = _existing(Path(path))
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free on {_mount_point(where)}"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"cannot write {path}: {DISK_FAULTS[fault]} ({free})", read_only=fault == errno.EROFS)


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what a file system can be asked about)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    return next(p for p in (path, *path.parents) if os.path.ismount(p))


def _size(n: int) -> str:
    """Bytes as people read them: 0 B, 812.3 kB, 3.1 MB (powers of 1000, as ``df -H``)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _umask() -> int:
    """This process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (and a final newline) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
