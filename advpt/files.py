"""Writing a file so that no reader ever sees half of it: write beside it, then ``os.replace``.

A run can be killed at any moment (pre-emption, Ctrl-C) while another process (``latest``, a study,
the report) reads the same folder; the rename is atomic on every POSIX file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed onto ``path`` when the block ends, removed
    if it raises. Its name is unique to this process and call, and hidden (a leading dot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        # The mode a plain open() would give: some writers (safetensors) create their file 0600,
        # which would keep a run's weights from the collaborators who share its folder.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
