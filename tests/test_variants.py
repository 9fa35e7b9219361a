"""Tests for advpt.data.variants on tiny image fixtures written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from advpt.data.variants import (
    IMAGENET_C_CORRUPTIONS,
    EvalSet,
    build_imagenet_variants,
    conflict_categories,
    group_mean,
    imagenet_synsets,
    subset_indices,
)

WNIDS = imagenet_synsets()


def _img(path: Path, mode: str = "RGB", value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), value).save(path)


def _build(root: Path) -> tuple[dict[str, EvalSet], list[str]]:
    msgs: list[str] = []
    sets = build_imagenet_variants(root, pil_to_tensor, warn=msgs.append)
    return {s.name: s for s in sets}, msgs


def _logits(*pairs: tuple[int, float], batch: int = 1) -> torch.Tensor:
    out = torch.zeros(batch, 1000)
    for i, v in pairs:
        out[:, i] = v
    return out


def test_empty_root_warns_once_per_set(tmp_path: Path) -> None:
    sets, msgs = _build(tmp_path)
    assert sets == {}
    assert len(msgs) == 8
    for name in ("imagenet_val", "imagenet_real", "imagenet_v2", "imagenet_a", "imagenet_r"):
        assert sum(m.startswith(f"{name}:") for m in msgs) == 1
    for name in ("imagenet_sketch", "conflict_stimuli", "imagenet_c"):
        assert sum(m.startswith(f"{name}:") for m in msgs) == 1
    # The warning names the path looked for.
    assert any(str(tmp_path / "imagenet-a") in m for m in msgs)
    assert any(str(tmp_path / "imagenetv2-matched-frequency-format-val") in m for m in msgs)


def test_default_warn_is_warnings_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="skipped") as record:
        assert build_imagenet_variants(tmp_path, pil_to_tensor) == []
    assert len(record) == 8


def test_val_labels_rgb_and_collate(tmp_path: Path) -> None:
    _img(tmp_path / "val" / WNIDS[7] / "ILSVRC2012_val_00000002.JPEG", mode="L")
    _img(tmp_path / "val" / WNIDS[3] / "ILSVRC2012_val_00000001.JPEG")
    _img(tmp_path / "val" / "not_a_wnid" / "x.JPEG")
    (tmp_path / "val" / WNIDS[3] / "notes.txt").write_text("x")  # not an image extension: ignored
    sets, msgs = _build(tmp_path)
    val = sets["imagenet_val"]
    assert val.group == "imagenet_val"
    # Labels are ImageNet-1k indices of the wnid, not positions among the folders present.
    assert sorted(t for _, t in val.dataset.samples) == [3, 7]
    x, y = next(iter(DataLoader(val.dataset, batch_size=2)))
    assert x.shape == (2, 3, 4, 4)  # grayscale file converted to RGB
    assert y.tolist() == [3, 7]
    assert val.correct(_logits((3, 5.0), batch=2), y).tolist() == [True, False]
    assert any("not_a_wnid" in m for m in msgs)


def test_v2_label_is_int_of_folder_name(tmp_path: Path) -> None:
    v2 = tmp_path / "imagenetv2-matched-frequency-format-val"
    _img(v2 / "2" / "a.jpeg")
    _img(v2 / "10" / "b.jpeg")
    _img(v2 / "999" / "c.jpeg")
    sets, _ = _build(tmp_path)
    ds = sets["imagenet_v2"].dataset
    labels = {p.parent.name: t for p, t in ds.samples}
    assert labels == {"2": 2, "10": 10, "999": 999}
    _, y = next(iter(DataLoader(ds, batch_size=3)))
    assert sorted(y.tolist()) == [2, 10, 999]


@pytest.mark.parametrize("which", ["a", "r"])
def test_imagenet_a_r_subset_masking(tmp_path: Path, which: str) -> None:
    sub = subset_indices(which)
    inside = set(sub)
    true_cls, other_in = sub[0], sub[1]
    outside = next(i for i in range(1000) if i not in inside)
    _img(tmp_path / f"imagenet-{which}" / WNIDS[true_cls] / "x.jpg")
    _img(tmp_path / f"imagenet-{which}" / WNIDS[outside] / "y.jpg")  # not one of the 200: ignored
    sets, msgs = _build(tmp_path)
    es = sets[f"imagenet_{which}"]
    assert [t for _, t in es.dataset.samples] == [true_cls]
    assert any(WNIDS[outside] in m for m in msgs)
    target = torch.tensor([true_cls])
    # Global argmax outside the 200, true class best among them -> correct.
    assert es.correct(_logits((outside, 9.0), (true_cls, 5.0), (other_in, 1.0)), target).item()
    assert top1_wrong(_logits((outside, 9.0), (true_cls, 5.0)), target)
    # Another of the 200 beats the true class -> wrong, even when an outside class is highest.
    assert not es.correct(_logits((outside, 9.0), (other_in, 6.0), (true_cls, 5.0)), target).item()


def top1_wrong(logits: torch.Tensor, target: torch.Tensor) -> bool:
    return bool((logits.argmax(-1) != target).all())


def test_real_scoring_and_exclusion(tmp_path: Path) -> None:
    for k, wnid in ((1, WNIDS[0]), (2, WNIDS[1]), (3, WNIDS[2])):
        _img(tmp_path / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG")
    (tmp_path / "real.json").write_text(json.dumps([[5, 6], [7], []]))
    sets, _ = _build(tmp_path)
    real = sets["imagenet_real"]
    assert real.group == "imagenet_real"
    x, y = next(iter(DataLoader(real.dataset, batch_size=3)))
    assert y.shape == (3, 1000) and y.dtype == torch.bool
    assert torch.nonzero(y[0]).flatten().tolist() == [5, 6]
    logits = torch.zeros(3, 1000)
    logits[0, 6] = 1.0  # in {5, 6}: correct
    logits[1, 8] = 1.0  # not in {7}: wrong
    logits[2, 0] = 1.0  # empty set: excluded
    assert real.correct(logits, y).tolist() == [True, False, False]
    assert real.valid(y).tolist() == [True, True, False]
    assert real.tally(logits, y) == (1, 2)


def test_real_falls_back_to_timm_labels(tmp_path: Path) -> None:
    # timm's copy: entry 0 (ILSVRC2012_val_00000001) is empty, entry 1 is [970, 795].
    _img(tmp_path / "val" / WNIDS[65] / "ILSVRC2012_val_00000001.JPEG")
    _img(tmp_path / "val" / WNIDS[970] / "ILSVRC2012_val_00000002.JPEG")
    sets, _ = _build(tmp_path)
    _, y = next(iter(DataLoader(sets["imagenet_real"].dataset, batch_size=2)))
    assert sets["imagenet_real"].valid(y).tolist() == [False, True]
    assert set(torch.nonzero(y[1]).flatten().tolist()) == {970, 795}


def test_conflict_stimuli_coarse_decision(tmp_path: Path) -> None:
    cats = list(conflict_categories())
    assert len(cats) == 16 and cats == sorted(cats)
    _img(tmp_path / "cue-conflict" / "cat" / "cat1-elephant2.png")
    _img(tmp_path / "cue-conflict" / "bear" / "bear1-clock1.png")
    sets, _ = _build(tmp_path)
    es = sets["conflict_stimuli"]
    _, y = next(iter(DataLoader(es.dataset, batch_size=2)))
    assert y.tolist() == [cats.index("bear"), cats.index("cat")]
    # Favour cat's ImageNet classes (281-286 are tabby ... cougar).
    logits = torch.zeros(2, 1000)
    logits[:, list(conflict_categories()["cat"])] = 6.0
    assert es.correct(logits, y).tolist() == [False, True]
    # Mean, not sum/max: one very confident dog class loses to uniformly confident bears.
    logits = torch.zeros(1, 1000)
    logits[0, list(conflict_categories()["bear"])] = 4.0
    logits[0, conflict_categories()["dog"][0]] = 4.5
    assert es.correct(logits, torch.tensor([cats.index("bear")])).item()


def test_conflict_alias_folder(tmp_path: Path) -> None:
    _img(tmp_path / "conflict_stimuli" / "knife" / "knife1-oven2.png")
    sets, _ = _build(tmp_path)
    assert sets["conflict_stimuli"].dataset.samples[0][1] == list(conflict_categories()).index("knife")


def test_conflict_mapping_matches_geirhos() -> None:
    cc = conflict_categories()
    assert cc["airplane"] == (404,) and cc["knife"] == (499,) and cc["oven"] == (766,)
    assert len(cc["dog"]) == 109 and len(cc["bird"]) == 49
    flat = [i for v in cc.values() for i in v]
    assert len(flat) == len(set(flat)) == 207


def test_imagenet_c_subsets_and_group_mean(tmp_path: Path) -> None:
    c = tmp_path / "imagenet-c"
    _img(c / "gaussian_noise" / "3" / WNIDS[1] / "a.JPEG")
    _img(c / "fog" / "5" / WNIDS[2] / "b.JPEG")
    _img(c / "not_a_corruption" / "1" / WNIDS[2] / "c.JPEG")
    _img(tmp_path / "sketch" / WNIDS[4] / "d.JPEG")
    sets, msgs = _build(tmp_path)
    in_c = sorted(n for n in sets if n.startswith("imagenet_c/"))
    assert in_c == ["imagenet_c/fog/5", "imagenet_c/gaussian_noise/3"]
    assert all(sets[n].group == "imagenet_c" for n in in_c)
    assert sets["imagenet_c/fog/5"].dataset.samples[0][1] == 2
    assert sum(m.startswith("imagenet_c:") and "73 of 75" in m for m in msgs) == 1
    assert "gaussian_noise" in IMAGENET_C_CORRUPTIONS and len(IMAGENET_C_CORRUPTIONS) == 15
    results = {"imagenet_c/fog/5": 0.2, "imagenet_c/gaussian_noise/3": 0.6, "imagenet_sketch": 0.3}
    means = group_mean(results, list(sets.values()))
    assert means == pytest.approx({"imagenet_c": 0.4, "imagenet_sketch": 0.3})


def test_sketch_alias_and_present_set_not_warned(tmp_path: Path) -> None:
    _img(tmp_path / "imagenet-sketch" / WNIDS[999] / "a.JPEG")
    sets, msgs = _build(tmp_path)
    assert list(sets) == ["imagenet_sketch"]
    assert sets["imagenet_sketch"].dataset.samples[0][1] == 999
    assert not any(m.startswith("imagenet_sketch") for m in msgs)
    assert len(msgs) == 7
