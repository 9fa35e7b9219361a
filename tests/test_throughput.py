"""``train/images_per_s``: images (not views) counted alike for every method, the clock read only where
the number is logged, after a CUDA synchronisation on a GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import default_collate

from advpt.training.callbacks import ImagesPerSecond, images_in


class Module:
    """What the callback reads of a LightningModule: its device, and ``log``."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)  # a device object needs no GPU to exist
        self.logged: list[tuple[str, float, int]] = []

    def log(self, name: str, value: float, batch_size: int) -> None:
        self.logged.append((name, value, batch_size))


def trainer(logged: bool, last: bool = False) -> Any:
    """A Trainer as the callback sees it: whether Lightning logs this step, whether it is the last."""
    return SimpleNamespace(
        _logger_connector=SimpleNamespace(should_update_logs=logged),
        fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=last))
        ),
        max_steps=-1,
        global_step=1,
    )


class Clock:
    def __init__(self, *times: float) -> None:
        self.times, self.reads = list(times), 0

    def __call__(self) -> float:
        self.reads += 1
        return self.times.pop(0)


def batch_of(views: str, images: int = 8) -> Any:
    """A training batch as the pre-training loader makes it: ``([view, ...], labels)``."""
    from advpt.data.module import Transformed
    from advpt.data.sources import Digits
    from advpt.data.transforms import pretrain_views

    dataset = Transformed(Digits(train=True, size=16), pretrain_views(views, 16), seed=0)
    return default_collate([dataset[(0, i)] for i in range(images)])


def measured(batch: Any, device: str = "cpu", seconds: float = 2.0) -> list[tuple[str, float, int]]:
    meter, module = ImagesPerSecond(), Module(device)
    meter._clock = Clock(10.0, 10.0 + seconds)
    meter.on_train_batch_start(trainer(True), module, batch, 0)
    meter.on_train_batch_end(trainer(True), module, None, batch, 0)
    return module.logged


def test_byol_and_mae_count_the_same_images_of_one_batch() -> None:
    byol, mae = batch_of("byol"), batch_of("mae")
    assert len(byol[0]) == 2 and len(mae[0]) == 1  # two views of each image against one
    assert images_in(byol) == images_in(mae) == 8
    assert measured(byol) == measured(mae) == [("train/images_per_s", 4.0, 8)]  # 8 images in 2 s


@pytest.mark.parametrize("device,syncs", [("cuda", 2), ("cpu", 0)])
def test_the_clock_is_read_where_the_number_is_logged_after_a_cuda_sync(
    monkeypatch, device: str, syncs: int
) -> None:
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    meter, module, batch = ImagesPerSecond(), Module(device), batch_of("mae")
    meter._clock = clock = Clock(0.0, 3.0)
    for step, logged in enumerate([False, False, True]):  # Lightning logs the third step
        meter.on_train_batch_start(trainer(logged), module, batch, step)
        meter.on_train_batch_end(trainer(logged), module, None, batch, step)
    assert module.logged == [("train/images_per_s", 8.0, 24)]  # 3 batches of 8 in 3 s
    assert clock.reads == 2  # at the window's start and where it is logged; not every step
    assert synced == [torch.device(device)] * syncs


def test_a_window_ends_at_the_last_batch_and_leaves_out_the_pause_between_epochs() -> None:
    meter, module, batch = ImagesPerSecond(), Module("cpu"), batch_of("mae")
    meter._clock = Clock(0.0, 1.0, 100.0, 102.0)
    meter.on_train_batch_start(trainer(False, last=True), module, batch, 0)
    meter.on_train_batch_end(trainer(False, last=True), module, None, batch, 0)  # the epoch's last batch
    meter.on_train_epoch_start(trainer(False), module)  # the monitor ran in between: not timed
    meter.on_train_batch_start(trainer(True), module, batch, 0)
    meter.on_train_batch_end(trainer(True), module, None, batch, 0)
    assert [value for _, value, _ in module.logged] == [8.0, 4.0]
