"""Label-scarce fine-tuning: the class-balanced subset, its record, and a schedule that survives it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import run_cli
from omegaconf import OmegaConf

from advpt.data import labelled
from advpt.data.sources import Digits
from advpt.errors import UserError
from advpt.finetune.command import VALIDATIONS, lengthen, summarise

FAST = ["trainer.enable_progress_bar=false", "model=vit_micro", "pretrained=none"]


def test_the_subset_holds_n_images_of_every_class() -> None:
    labels = [i % 7 for i in range(200)]
    kept = labelled.draw(labels, per_class=5, fraction=None, seed=3)
    assert Counter(labels[i] for i in kept) == {c: 5 for c in range(7)}
    assert kept == sorted(set(kept))


def test_a_fraction_keeps_that_share_of_each_class_and_at_least_one() -> None:
    labels = [0] * 100 + [1] * 10 + [2] * 3
    kept = labelled.draw(labels, per_class=None, fraction=0.1, seed=0)
    assert Counter(labels[i] for i in kept) == {0: 10, 1: 1, 2: 1}


def test_a_class_smaller_than_n_gives_every_image_it_has() -> None:
    labels = [0] * 30 + [1] * 2
    kept = labelled.draw(labels, per_class=5, fraction=None, seed=0)
    assert Counter(labels[i] for i in kept) == {0: 5, 1: 2}


def test_the_subset_depends_on_the_seed_alone() -> None:
    labels = Digits(train=True).targets
    once = labelled.draw(labels, 10, None, seed=1)
    assert once == labelled.draw(list(labels), 10, None, seed=1)
    assert once != labelled.draw(labels, 10, None, seed=2)


def test_a_class_s_images_do_not_depend_on_the_other_classes() -> None:
    # arms of a study share labels by seed; a class's draw must not move when another class grows
    small = [0] * 20 + [1] * 20
    large = [0] * 20 + [1] * 60
    first = [i for i in labelled.draw(small, 4, None, seed=5) if small[i] == 0]
    second = [i for i in labelled.draw(large, 4, None, seed=5) if large[i] == 0]
    assert first == second


def test_both_a_count_and_a_fraction_are_refused() -> None:
    with pytest.raises(UserError, match="choose one"):
        labelled.check({"name": "builtin", "labels_per_class": 2, "label_fraction": 0.1})


def test_min_steps_raises_the_epochs_of_a_small_set_and_spreads_validation() -> None:
    cfg = OmegaConf.create(
        {
            "optim": {"min_steps": 300},
            "data": {"batch_size": 64},
            "trainer": {"max_epochs": 20, "max_steps": -1, "devices": "auto", "num_nodes": 1},
        }
    )
    lengthen(cfg, images=200)  # 3 steps an epoch (a last partial batch is dropped)
    epochs, every = cfg.trainer.max_epochs, cfg.trainer.check_val_every_n_epoch
    assert epochs * 3 >= 300 and (epochs - every) * 3 < 300
    assert epochs % every == 0 and epochs // every >= VALIDATIONS


def test_min_steps_leaves_a_long_enough_or_step_defined_schedule_alone() -> None:
    base = {"optim": {"min_steps": 300}, "data": {"batch_size": 64}}
    long_enough = OmegaConf.create({**base, "trainer": {"max_epochs": 20, "max_steps": -1}})
    lengthen(long_enough, images=1437)  # 22 steps an epoch: 440 steps
    assert long_enough.trainer.max_epochs == 20 and "check_val_every_n_epoch" not in long_enough.trainer
    in_steps = OmegaConf.create({**base, "trainer": {"max_epochs": -1, "max_steps": 50}})
    lengthen(in_steps, images=100)
    assert in_steps.trainer.max_steps == 50 and in_steps.trainer.max_epochs == -1


def test_two_processes_take_half_the_steps_an_epoch_so_more_epochs() -> None:
    one = OmegaConf.create(
        {"optim": {"min_steps": 60}, "data": {"batch_size": 8}, "trainer": {"max_epochs": 1, "devices": 1}}
    )
    two = OmegaConf.create(
        {"optim": {"min_steps": 60}, "data": {"batch_size": 8}, "trainer": {"max_epochs": 1, "devices": 2}}
    )
    lengthen(one, images=160)
    lengthen(two, images=160)
    assert one.trainer.max_epochs * 20 >= 60 and two.trainer.max_epochs * 10 >= 60
    assert two.trainer.max_epochs > one.trainer.max_epochs


def test_an_unconverged_run_says_so_with_the_command_that_continues_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"command": "finetune", "steps": 100, "val_top1": 0.5}))
    rows = ["epoch,step,val/top1"] + [f"{e},{e},{0.1 + 0.02 * e}" for e in range(20)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    text = summarise(run, ["pretrained=x", "optim.min_steps=100", "data.labels_per_class=10"])
    assert "NOT CONVERGED" in text
    last = text.splitlines()[-1]
    assert "optim.min_steps=200" in last and "optim.min_steps=100" not in last
    assert "pretrained=x" in last and "data.labels_per_class=10" in last and "-longer" in last
    flat = ["epoch,step,val/top1"] + [f"{e},{e},{0.5 if e > 3 else 0.1}" for e in range(20)]
    (run / "metrics.csv").write_text("\n".join(flat) + "\n")
    assert "NOT CONVERGED" not in summarise(run, [])


def subset_of(run: Path) -> dict:
    return json.loads((run / "labelled.json").read_text())


def test_finetune_labels_per_class_writes_its_subset_and_same_seed_same_images(tmp_path: Path) -> None:
    args = ["finetune", *FAST, "data.labels_per_class=3", "optim.min_steps=4", "trainer.max_epochs=1"]
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert run_cli([*args, "seed=0", f"hydra.run.dir={runs[0]}"]) == 0
    assert run_cli([*args, "seed=0", f"hydra.run.dir={runs[1]}"]) == 0
    assert run_cli([*args, "seed=1", f"hydra.run.dir={runs[2]}"]) == 0
    first = subset_of(runs[0])
    targets = Digits(train=True).targets
    assert Counter(targets[i] for i in first["indices"]) == {c: 3 for c in range(10)}
    assert first["images"] == 30 and first["of"] == len(targets)
    assert subset_of(runs[1])["indices"] == first["indices"]
    assert subset_of(runs[2])["indices"] != first["indices"]
    # 30 images at batch 64 are one step an epoch: the epoch raised to hold optim.min_steps
    record = json.loads((runs[0] / "run.json").read_text())
    assert record["steps"] == 4
    assert OmegaConf.load(runs[0] / "config.yaml").trainer.max_epochs == 4


def test_labels_seed_pairs_arms_of_different_seeds(tmp_path: Path) -> None:
    args = ["finetune", *FAST, "data.labels_per_class=2", "data.labels_seed=7", "trainer.max_steps=1"]
    assert run_cli([*args, "seed=0", f"hydra.run.dir={tmp_path / 'a'}"]) == 0
    assert run_cli([*args, "seed=1", f"hydra.run.dir={tmp_path / 'b'}"]) == 0
    assert subset_of(tmp_path / "a")["indices"] == subset_of(tmp_path / "b")["indices"]
    assert subset_of(tmp_path / "a")["labels_seed"] == 7
