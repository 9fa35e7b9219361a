"""What runs exist and what they hold: one meaning of `latest` for every command."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from advpt.errors import UserError
from advpt.runs import (
    finished_runs,
    is_finished,
    latest,
    read_record,
    resolve_latest_input,
    summary,
    write_record,
)


def make_run(directory: Path, command: str = "pretrain", steps: int | None = 1, age: float = 0) -> Path:
    """A run directory with its product written ``age`` seconds ago (and run.json if ``steps`` is given)."""
    product = {"pretrain": "encoder.safetensors", "finetune": "model.safetensors"}[command]
    directory.mkdir(parents=True)
    (directory / product).write_bytes(b"")
    if steps is not None:
        write_record(directory, command, steps)
    stamp = time.time() - age
    os.utime(directory / product, (stamp, stamp))
    return directory


def test_latest_is_the_newest_finished_run_under_outputs_and_multirun(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert latest("pretrain") is None
    make_run(tmp_path / "outputs" / "pretrain" / "mae-l2" / "a", age=300)
    swept = make_run(tmp_path / "multirun" / "pretrain" / "t" / "0-method-mae", age=200)
    assert latest("pretrain").directory == swept.resolve()  # multirun counts as much as outputs
    assert (
        resolve_latest_input("finetune") == swept.resolve() / "encoder.safetensors"
    )  # finetune's pretrained=latest


def test_latest_never_picks_a_run_that_trained_nothing_or_did_not_finish(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = make_run(tmp_path / "outputs" / "pretrain" / "mae-l2" / "good", age=300)
    make_run(tmp_path / "outputs" / "pretrain" / "mae-l2" / "zero", steps=0, age=100)
    running = tmp_path / "outputs" / "pretrain" / "mae-l2" / "running"
    (running / "checkpoints").mkdir(parents=True)  # no encoder yet: still training, or killed
    (running / "config.yaml").write_text("{}")
    assert [r.directory.name for r in finished_runs("pretrain")] == ["good"]
    assert latest("pretrain").directory == good.resolve()
    assert not is_finished(tmp_path / "outputs" / "pretrain" / "mae-l2" / "zero", "pretrain")
    assert not is_finished(running, "pretrain")


def test_runs_without_a_record_count_when_their_product_is_there(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "outputs" / "finetune" / "adamw_lld" / "old", "finetune", steps=None)
    assert read_record(run) == {} and is_finished(run, "finetune")
    assert resolve_latest_input("evaluate") == run.resolve() / "model.safetensors"


def test_every_command_reads_latest_the_same_way(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command, needle in (
        ("finetune", "run advpt pretrain first or pass pretrained=PATH"),
        ("evaluate", "run advpt finetune first or pass checkpoint=PATH"),
        ("visualize", "run advpt pretrain first or pass checkpoint=PATH"),
    ):
        with pytest.raises(UserError, match=needle):
            resolve_latest_input(command)
    fine = make_run(tmp_path / "multirun" / "finetune" / "t" / "0-layer_decay=0.65", "finetune")
    assert (
        resolve_latest_input("visualize") == fine.resolve() / "model.safetensors"
    )  # no pretrain run: fine-tuned
    pre = make_run(tmp_path / "outputs" / "pretrain" / "mae-l2" / "p", age=100)
    assert (
        resolve_latest_input("visualize") == pre.resolve() / "encoder.safetensors"
    )  # pre-trained filters first
    assert resolve_latest_input("evaluate") == fine.resolve() / "model.safetensors"


def test_summary_names_the_run_and_the_next_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "pretrain" / "x y"
    text = summary("pretrain", run, "1 step", "advpt finetune pretrained=P")
    assert text.splitlines() == [
        "advpt pretrain: 1 step",
        "  run:  'outputs/pretrain/x y'",
        "  next: advpt finetune pretrained=P",
    ]


def test_atomic_writes_give_files_the_usual_mode_even_from_a_0600_writer(tmp_path) -> None:
    import os
    import stat

    from advpt.files import atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "weights.safetensors") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # what safetensors does
            os.close(fd)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "weights.safetensors").stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [tmp_path / "weights.safetensors"]


def test_the_model_summary_has_no_flops_column_of_zeros(caplog) -> None:
    import logging

    import lightning as L
    import torch
    from lightning.pytorch.utilities.model_summary import summarize

    from advpt.training.harness import ParameterSummary

    class Small(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

    found = summarize(Small(), max_depth=1)
    data = found._get_summary_data()
    assert "FLOPs" in [name for name, _ in data]  # Lightning's own table has it (all zeros without an input)
    with caplog.at_level(logging.INFO):
        ParameterSummary.summarize(
            data, found.total_parameters, found.trainable_parameters, found.model_size,
            found.total_training_modes, found.total_flops,
        )  # fmt: skip
    assert "net" in caplog.text and "Trainable params" in caplog.text
    assert "FLOPs" not in caplog.text and "Flops" not in caplog.text


@pytest.mark.parametrize("failed", [False, True])
def test_wandb_finishes_when_fit_ends_so_the_summary_is_the_last_line(tmp_path: Path, failed: bool) -> None:
    from types import SimpleNamespace
    from unittest import mock

    from lightning.pytorch.loggers import WandbLogger

    from advpt.training import harness

    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    logger._experiment = mock.Mock()

    def fit(*_args, **_kwargs) -> None:
        if failed:
            raise RuntimeError("diverged")

    trainer = SimpleNamespace(loggers=[logger], fit=fit)
    if failed:
        with pytest.raises(RuntimeError):
            harness.fit(trainer, None, None, None)  # type: ignore[arg-type]
    else:
        harness.fit(trainer, None, None, None)  # type: ignore[arg-type]
    logger._experiment.finish.assert_called_once_with(exit_code=1 if failed else 0)


def test_image_panels_are_enlarged_to_be_seen_pixel_for_pixel() -> None:
    import torch

    from advpt.training.callbacks import viewable

    panel = torch.rand(2, 3, 16, 48)  # clean | delta | adversarial of a 16-px image
    big = viewable(panel)
    assert big.shape == (2, 3, 224, 672)  # 14 x: the smallest whole factor reaching 224 px
    assert torch.equal(big[:, :, ::14, ::14], panel)  # every pixel repeated, none blended
    assert torch.equal(big[:, :, 13::14, 13::14], panel)
    assert viewable(torch.rand(1, 3, 224, 224)).shape == (1, 3, 224, 224)  # large enough already
    assert viewable(torch.rand(1, 3, 100, 100)).shape == (1, 3, 300, 300)
