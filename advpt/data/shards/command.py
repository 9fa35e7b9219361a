"""The ``advpt shards`` command: a dataset's splits as webdataset shards plus ``info.json``.

``advpt shards data=<source> out=DIR`` copies every image of the training and evaluation splits into
tar shards (``train-%06d.tar``, ``val-%06d.tar``), re-encoding only when ``max_side`` or ``quality``
ask for it. An interrupted write is finished by running the same command again.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from advpt.errors import UserError


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """``out`` is given and writable for this source; the source exists (before anything is written)."""
    from advpt.config import check_arguments, check_data
    from advpt.data.shards.write import check_out

    check_arguments("shards", cfg)
    if cfg.out is None or not str(cfg.out).strip():
        raise UserError("advpt shards needs out=DIR (the folder to write the shards into)")
    if cfg.data.name == "shards":
        raise UserError("data=shards is already sharded: give the source the shards were written from")
    check_out(Path(str(cfg.out)).expanduser(), cfg.data)
    if touch_data:
        check_data(cfg)
    return cfg


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from advpt.data.shards.write import write_shards
    from advpt.runs import shown, summary

    check(cfg, touch_data=False)
    out = Path(str(cfg.out)).expanduser()
    info = write_shards(
        cfg.data,
        out,
        shard_size=int(cfg.shard_size),
        max_side=cfg.max_side,
        quality=cfg.quality,
    )
    splits = info["splits"]
    counts = ", ".join(
        f"{s['samples']} {name} samples in {len(s['shards'])} shard{'s' if len(s['shards']) != 1 else ''}"
        for name, s in splits.items()
    )
    skipped = sum(len(s["skipped"]) for s in splits.values())
    headline = f"{counts} ({len(info['classes'])} classes) in {shown(out)}" + (
        f"; {skipped} unreadable file{'s' if skipped != 1 else ''} left out (listed in info.json)"
        if skipped
        else ""
    )
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    print(summary("shards", run_dir, headline, f"advpt pretrain data=shards data.root={shown(out)}"))
