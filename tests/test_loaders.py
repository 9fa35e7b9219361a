"""Loaders sized to the machine: the default worker count, the /dev/shm refusal, the evaluation pool."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose, finetuned_run
from torch.utils.data import TensorDataset

from advpt.config import machine
from advpt.data.corruptions import CORRUPTIONS
from advpt.data.skipping import eval_loaders
from advpt.errors import UserError

Usage = namedtuple("Usage", "total used free")


def small_shm(monkeypatch, free: int) -> None:
    """``/dev/shm`` with ``free`` bytes free; every other file system as it is."""
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(free, 0, free) if str(path) == "/dev/shm" else real(path)
    )


@pytest.mark.parametrize(
    "cores,processes,expected",
    [
        (2, 1, 1),  # this project's 2-core machine: one worker beside the training process
        (1, 1, 0),  # one core: the training process loads
        (16, 1, 8),  # 15 spare, capped
        (16, 8, 1),  # 16 cores for 8 GPUs: 2 each, one kept for each process
        (128, 8, 8),  # 16 each: capped
        (4, 8, 0),  # fewer cores than processes
    ],
)
def test_the_default_comes_from_the_cores_this_process_may_use_per_process(
    monkeypatch, cores: int, processes: int, expected: int
) -> None:
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert machine.loader_workers(None, processes) == expected
    assert machine.loader_workers(3, processes) == 3  # a number is taken as given
    assert machine.loader_workers(0, processes) == 0


def test_without_an_affinity_the_cpu_count_decides(monkeypatch) -> None:
    monkeypatch.delattr(machine.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 6)
    assert machine.loader_workers(None) == 5
    assert machine.loader_workers(None, 2) == 2


def test_the_data_configs_leave_it_to_the_machine() -> None:
    from advpt.config import CONF_DIR, compose

    names = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
    assert "builtin" in names and "imagefolder" in names
    for name in names:
        assert compose("pretrain", [f"data={name}"]).data.num_workers is None, name
    assert compose("evaluate", []).num_workers is None


def test_a_run_says_the_count_it_chose(monkeypatch, capsys) -> None:
    from advpt.data.module import PretrainData

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    data = PretrainData({"name": "builtin", "root": None, "batch_size": 8, "num_workers": None}, "byol", 16)
    assert data.loader_workers(None, 8, 16, views=2) == 3
    assert data.loader_workers(None, 8, 16, views=2) == 3  # said once
    assert capsys.readouterr().out == (
        "advpt: 3 loader workers (data.num_workers=null: 4 cores, one kept for the main process, at most 8)\n"
    )
    assert data.loader_workers(2, 8, 16) == 2


def test_a_dev_shm_too_small_for_the_batches_is_one_line_naming_shm_size(monkeypatch) -> None:
    from advpt.data.module import PretrainData

    small_shm(monkeypatch, 64_000_000)  # Docker's default
    # 8 workers x 2 prefetched batches x 256 x 3 x 224 x 224 x 4 bytes: about 2.5 GB
    with pytest.raises(UserError) as refused:
        machine.check_shared_memory(8, machine.batch_bytes(256, 224))
    message = str(refused.value)
    assert "\n" not in message and "--shm-size" in message and "data.num_workers=8" in message
    assert "64.0 MB free" in message and "2.5 GB" in message
    machine.check_shared_memory(0, machine.batch_bytes(256, 224))  # the main process loads: no shm
    machine.check_shared_memory(1, machine.batch_bytes(64, 32))  # 1.6 MB fits
    # where the loader is built, before any worker starts; the datamodule refuses the same way
    # 8 x 2 x 256 x 3 x 64 x 64 x 4 bytes: 201 MB
    data = PretrainData({"name": "builtin", "root": None, "batch_size": 256, "num_workers": 8}, "mae", 64)
    with pytest.raises(UserError, match="--shm-size"):
        data.train_dataloader()


def test_the_cli_turns_the_refusal_into_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from helpers import run_cli

    monkeypatch.chdir(tmp_path)
    small_shm(monkeypatch, 100_000)  # 2 workers x 2 batches of 64 x 3 x 16 x 16 x 4 bytes: 393 kB
    args = ["pretrain", "model=vit_micro", "monitor=none", "trainer.max_steps=1", "data.num_workers=2"]
    assert run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("advpt pretrain: error: /dev/shm has 100 kB free") and "--shm-size" in err[-1]
    assert not (tmp_path / "run").exists()


def test_the_corruption_suite_is_loaded_by_workers(tmp_path: Path, monkeypatch) -> None:
    """num_workers unset: every set, the 75 corruption subsets included, is read by loader processes,
    the subsets from one pool (one loader for the group)."""
    from advpt.evaluate import command, evaluate

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    pools: list[tuple[int, int]] = []  # (datasets, workers) per loader of the clean sets

    def recorded(datasets, batch_size, num_workers=0, pin_memory=None):
        pools.append((len(datasets), num_workers))
        return eval_loaders(datasets, batch_size, 0, pin_memory)  # in this process: the test stays fast

    monkeypatch.setattr(command, "eval_loaders", recorded)
    run = finetuned_run(tmp_path / "ft")
    cfg = compose(f"checkpoint={run}", *[a for a in FAST if not a.startswith("num_workers")])
    results = evaluate(cfg, tmp_path / "out", warn=pytest.fail)
    assert pools == [(1, 3), (75, 3)]  # the test split, then the corruptions in one pool
    assert list(results["sets"]) == ["builtin", "corruptions", *(f"corruptions/{c}" for c in CORRUPTIONS)]


def test_one_pool_serves_several_datasets_in_order_never_mixing_them() -> None:
    sizes = [5, 0, 3, 7]
    datasets = [TensorDataset(torch.arange(n) + 100 * k, torch.full((n,), k)) for k, n in enumerate(sizes)]
    for workers in (0, 2):
        got = [[batch for batch in batches] for batches in eval_loaders(datasets, 3, workers)]
        assert [[len(b[0]) for b in batches] for batches in got] == [[3, 2], [], [3], [3, 3, 1]]
        for k, batches in enumerate(got):
            assert all(bool((b[1] == k).all()) for b in batches)  # a batch holds one dataset's items
            values = torch.cat([b[0] for b in batches]) if batches else torch.zeros(0)
            assert values.tolist() == (torch.arange(sizes[k]) + 100 * k).tolist()


def test_a_resume_after_an_epoch_cut_short_starts_the_next_epoch_with_loader_processes() -> None:
    """``trainer.limit_train_batches`` ends an epoch before its loader does. Lightning builds the loader's
    iterator before it sets the sampler's epoch, and loader processes draw their first indices at once:
    the saved position must already say the next epoch."""
    from types import SimpleNamespace

    from advpt.data.module import EpochSampler, PretrainData

    cfg = {"name": "builtin", "root": None, "batch_size": 8, "num_workers": 2}
    data = PretrainData(cfg, "mae", 16, seed=3)
    data.trainer = SimpleNamespace(limit_train_batches=2, num_devices=1, global_rank=0, world_size=1)
    data.load_state_dict({"epoch": 0, "batches": 2})  # saved after the 2 batches of epoch 0
    loader = data.train_dataloader()
    batches = iter(loader)  # as Lightning's setup_data: the processes start drawing
    loader.sampler.set_epoch(1)  # then Lightning's epoch start
    (_, labels), expected = next(batches), EpochSampler(len(data.source), seed=3)
    expected.set_epoch(1)
    assert labels.tolist() == [data.source[i][1] for _, i in list(expected)[:8]]
