"""``outcomes.npz``: which images each model got right, written by ``advpt evaluate`` beside ``results.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, compose, finetuned_run
from torch import Tensor, nn

from advpt.data.corruptions import CORRUPTIONS
from advpt.evaluate import evaluate
from advpt.outcomes import Outcomes, read_outcomes, write_outcomes


def test_outcomes_round_trip_with_shared_image_indices_stored_once(tmp_path: Path) -> None:
    same = np.array([4, 9, 17])
    outcomes = {
        "builtin": Outcomes(np.array([True, False, True]), same),
        "corruptions/fog/1": Outcomes(np.array([False, False, True]), same.copy()),
        "robust/linf/2/255": Outcomes(np.array([True, True]), np.array([4, 17])),
    }
    path = write_outcomes(tmp_path / "outcomes.npz", outcomes, "auto|builtin|seed=0")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(k for k in z.files if k.startswith("_ids/")) == ["_ids/0", "_ids/1"]
        assert z["robust/linf/2/255"].dtype == bool  # readable by key, as results.json names it
    back = read_outcomes(path)
    assert back is not None and back.split == "auto|builtin|seed=0" and list(back.outcomes) == list(outcomes)
    for key, o in outcomes.items():
        assert back.outcomes[key].correct.tolist() == o.correct.tolist()
        assert back.outcomes[key].ids.tolist() == o.ids.tolist()
    assert back.same_images(back, "builtin") and not back.same_images(back, "absent")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert read_outcomes(tmp_path / "junk.npz") is None and read_outcomes(tmp_path / "absent.npz") is None


def test_outcomes_hold_every_accuracy_on_the_same_images_for_every_model(tmp_path: Path) -> None:
    from advpt.data.sources import Digits

    runs = [finetuned_run(tmp_path / "a"), finetuned_run(tmp_path / "b", constant=3)]
    files, all_results = [], []
    for i, run in enumerate(runs):
        results = evaluate(compose(f"checkpoint={run}", *FAST), tmp_path / f"out{i}", warn=pytest.fail)
        assert results["outcomes"] == "outcomes.npz"
        files.append(read_outcomes(tmp_path / f"out{i}" / "outcomes.npz"))
        all_results.append(results)
    for results, file in zip(all_results, files, strict=True):
        sets, robust = results["sets"], results["robust"]
        stated = {"builtin": sets["builtin"]["top1"]}
        for c in CORRUPTIONS:
            stated |= {f"corruptions/{c}/{k}": v for k, v in sets[f"corruptions/{c}"]["severities"].items()}
        stated |= {f"robust/{n}/{r}": e["accuracy"] for n, by in robust.items() for r, e in by.items()}
        assert {k: float(o.correct.mean()) for k, o in file.outcomes.items()} == stated  # exactly
    a, b = files
    assert a.split == b.split == "auto|builtin|seed=0"
    assert list(a.outcomes) == list(b.outcomes) and all(a.same_images(b, k) for k in a.outcomes)
    # the images: the 4 of the test split that max_images draws with the seed, in order
    test = Digits(train=False, size=16)
    keep = sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:4].tolist())
    assert all(o.ids.tolist() == keep for o in a.outcomes.values())
    # the second model predicts class 3 everywhere: right exactly on the images labelled 3
    labels = np.array([test.targets[i] for i in keep])
    assert b.outcomes["builtin"].correct.tolist() == (labels == 3).tolist()
    assert b.outcomes["robust/l2/0.5"].correct.tolist() == (labels == 3).tolist()


def test_outcomes_trace_each_image_to_its_index_past_unreadable_ones() -> None:
    from torch.utils.data import Dataset

    from advpt.data.skipping import eval_loader
    from advpt.data.variants import EvalSet, top1_correct
    from advpt.evaluate import capped
    from advpt.evaluate.scoring import Numbered, clean_outcomes

    class Holes(Dataset):
        """Six images, value i and label i % 2; images 1 and 4 cannot be read."""

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return None if i in (1, 4) else (torch.full((3, 2, 2), float(i)), i % 2)

    class Positive(nn.Module):  # class 1 when the image is positive
        def forward(self, x: Tensor) -> Tensor:
            z = x.flatten(1).mean(1)
            return torch.stack([torch.zeros_like(z), z], dim=-1)

    evalset = EvalSet("holes", Holes(), top1_correct, "holes")
    got = clean_outcomes(Positive(), evalset, eval_loader(capped(Numbered(Holes()), None, 0), 2))
    assert got.ids.tolist() == [0, 2, 3, 5]
    assert got.correct.tolist() == [True, False, True, True]
