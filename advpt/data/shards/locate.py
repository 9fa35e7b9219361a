"""Where a ``data=shards`` config's shards and info.json are: URL expansion, info.json, shard checks."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.data.shards.layout import FORMAT, INFO
from advpt.errors import UserError
from advpt.trust import runs_program


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _expand(value: Any) -> list[str]:
    """A brace pattern, a ``::``-joined list, or a list of them, as a list of shard URLs."""
    from webdataset.shardlists import expand_urls

    items = [value] if isinstance(value, str) else [str(v) for v in value]
    urls: list[str] = []
    for item in items:
        urls += [str(Path(u).expanduser()) if not is_remote(u) else u for u in expand_urls(item)]
    return urls


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _read_json(url: str) -> dict[str, Any] | None:
    """A JSON file, local or remote; ``None`` when it cannot be read."""
    import webdataset as wds

    try:
        if is_remote(url):
            with wds.gopen(url, "rb") as f:
                return json.loads(f.read())
        return json.loads(Path(url).read_text())
    except Exception:  # absent, unreachable, not JSON: the caller says what is missing
        return None


class Located:
    """Where a ``data=shards`` config's shards and info.json are, resolved once (one line if they are not)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        root = data.get("root")
        items = [] if root is None else [root] if isinstance(root, str) else [str(r) for r in root]
        if not any(str(i).strip() for i in items):
            raise UserError(
                "data=shards needs data.root=DIR (a folder written by `advpt shards`) "
                "or a list / brace pattern of shard URLs"
            )
        single = items[0] if len(items) == 1 else None
        folder = Path(single).expanduser() if single and not is_remote(single) else None
        info_url = data.get("info")
        if folder is not None and folder.is_dir():
            self.root = str(folder)
            info_url = str(info_url or folder / INFO)
            info = _read_json(info_url)
            if info is None:
                raise UserError(
                    f"data.root={root} holds no readable {INFO}: not a finished `advpt shards` output "
                    f"(rerun `advpt shards ... out={root}`: it finishes an interrupted write)"
                )
            self.train = [str(folder / n) for n in _names(info, "train")]
        else:
            if folder is not None and not any(c in single for c in "{}:") and not folder.exists():
                raise UserError(f"data.root={root} does not exist")
            self.root = ",".join(items)
            self.train = _expand(items)
            info_url = str(info_url or _parent(self.train[0]) + "/" + INFO)
            info = _read_json(info_url)
            if info is None:
                raise UserError(
                    f"cannot read {info_url} (the classes and counts `advpt shards` writes beside the "
                    "shards); pass data.info=PATH_OR_URL"
                )
        if info.get("format") != FORMAT:
            raise UserError(f"{info_url} is not an `advpt shards` info file (format {info.get('format')!r})")
        if not self.train:
            raise UserError(f"data.root={root} names no training shard")
        self.info, self.info_url = info, info_url
        val = data.get("val")
        if val:
            self.val: list[str] | None = _expand(val)
        else:
            names = _names(info, "val")
            self.val = [_parent(self.info_url) + "/" + n for n in names] if names else None
        self.classes: list[str] = [str(c) for c in info.get("classes", [])]

    def count(self, split: str) -> int:
        return int(((self.info.get("splits") or {}).get(split) or {}).get("samples", 0))


def _names(info: Mapping[str, Any], split: str) -> list[str]:
    """The shard file names info.json lists for ``split``: plain names of files beside it, nothing else
    (a path or URL there would be read, or run, from a file: ``advpt.trust``)."""
    entry = (info.get("splits") or {}).get(split)
    names = [str(s["name"]) for s in entry["shards"]] if entry else []
    for name in names:
        if name != Path(name).name or name in (".", "..") or runs_program(name):
            raise UserError(f"{INFO} lists shard {name!r}, which is not a file name beside it")
    return names


def check_shards(urls: Sequence[str], what: str) -> None:
    """Every local shard exists and is a tar file; the first remote one can be opened. One line if not."""
    import webdataset as wds

    for url in urls:
        if is_remote(url):
            continue
        path = Path(url)
        if not path.is_file():
            raise UserError(f"{what} shard {url} does not exist")
        try:
            with tarfile.open(path, "r:"):
                pass
        except (OSError, tarfile.TarError) as e:
            raise UserError(
                f"{what} shard {url} is not a readable tar file ({type(e).__name__}: {e})"
            ) from None
    remote = [u for u in urls if is_remote(u)]
    if remote:
        try:
            with wds.gopen(remote[0], "rb") as f:
                f.read(512)
        except Exception as e:
            raise UserError(f"{what} shard {remote[0]} cannot be read ({type(e).__name__}: {e})") from None
