"""Transfer datasets of Table 1 (SUN397, RESISC45, DMLab): tiny fakes in their published layouts."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line, run_cli
from PIL import Image

from advpt.data.sources import build_source, check_source, num_classes
from advpt.data.transfer import seeded_split
from advpt.errors import UserError

FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def image(path: Path, shade: int = 0, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 7)).save(path)


def labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


# -- SUN397 ------------------------------------------------------------------------------------------------
SUN_CLASSES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bar"]  # ClassName.txt, nested class included


def fake_sun397(root: Path, per_class: int = 5) -> dict[str, int]:
    """root/SUN397 as SUN397.tar.gz extracts; returns each image's key (as in the partition lists) -> label."""
    folder = root / "SUN397"
    folder.mkdir(parents=True)
    (folder / "ClassName.txt").write_text("\n".join(SUN_CLASSES) + "\n")
    keys = {}
    for label, cls in enumerate(SUN_CLASSES):
        for k in range(per_class):
            key = f"{cls}/sun_{label}{k:03d}.jpg"
            image(folder / key.lstrip("/"), shade=40 * label)
            keys[key] = label
    return keys


def test_sun397_seeded_split_without_partition_lists(tmp_path: Path) -> None:
    keys = fake_sun397(tmp_path, per_class=5)
    data = {"name": "sun397", "root": str(tmp_path)}
    check_source(data)
    train, test = build_source(data, train=True), build_source(data, train=False)
    assert train.classes == ["abbey", "apartment_building/outdoor", "bar"] and num_classes(train) == 3
    assert num_classes(test) == 3
    # 80/20 per class: 4 + 1 of each class's 5, disjoint, together every image
    assert sorted(labels_of(train)) == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(labels_of(test)) == [0, 1, 2]
    files = train.base._image_files
    train_files = {files[i] for i in train.indices}
    test_files = {files[i] for i in test.indices}
    assert not train_files & test_files and len(train_files | test_files) == len(keys)
    # each label is the class folder the image lies in
    folder = tmp_path / "SUN397"
    for split in (train, test):
        for i, j in enumerate(split.indices):
            assert keys["/" + Path(files[j]).relative_to(folder).as_posix()] == split[i][1]


def test_sun397_official_partition_one(tmp_path: Path) -> None:
    keys = fake_sun397(tmp_path, per_class=4)
    ordered = sorted(keys)
    train_list, test_list = ordered[0::2], ordered[1::2]
    partitions = tmp_path / "SUN397" / "Partitions"
    partitions.mkdir()
    (partitions / "Training_01.txt").write_text("\n".join(train_list) + "\n")
    (partitions / "Testing_01.txt").write_text("\n".join(test_list) + "\n")
    (partitions / "Training_02.txt").write_text(ordered[0] + "\n")  # another partition: not read
    data = {"name": "sun397", "root": str(tmp_path)}
    train, test = build_source(data, train=True), build_source(data, train=False)
    files, folder = train.base._image_files, tmp_path / "SUN397"
    assert ["/" + Path(files[j]).relative_to(folder).as_posix() for j in train.indices] == train_list
    assert ["/" + Path(files[j]).relative_to(folder).as_posix() for j in test.indices] == test_list
    assert labels_of(test) == [keys[k] for k in test_list]


def test_sun397_partition_naming_a_missing_image(tmp_path: Path) -> None:
    keys = fake_sun397(tmp_path, per_class=2)
    folder = tmp_path / "SUN397"
    (folder / "Training_01.txt").write_text("\n".join([*sorted(keys), "/b/bar/sun_gone.jpg"]) + "\n")
    (folder / "Testing_01.txt").write_text(sorted(keys)[0] + "\n")
    with pytest.raises(UserError, match="1 images listed in .*Training_01.txt.*sun_gone.jpg"):
        build_source({"name": "sun397", "root": str(tmp_path)}, train=True)


def test_seeded_split_is_stratified_and_independent_of_file_order() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 1
    keys = [f"{label}/{i:02d}.jpg" for i, label in enumerate(labels)]
    test = seeded_split(labels, keys, train=False)
    train = seeded_split(labels, keys, train=True)
    assert [labels[i] for i in test].count(0) == 2 and [labels[i] for i in test].count(1) == 1
    assert sorted(train + test) == list(range(16)) and 15 in train  # a one-image class trains
    # the same files listed in another order: the same images chosen
    order = list(reversed(range(16)))
    again = seeded_split([labels[i] for i in order], [keys[i] for i in order], train=False)
    assert sorted(keys[order[i]] for i in again) == sorted(keys[i] for i in test)
    assert seeded_split(labels, keys, train=False, seed=1) != test  # the seed decides


# -- RESISC45 ----------------------------------------------------------------------------------------------
RESISC_CLASSES = ["airplane", "beach", "sea_ice"]


def fake_resisc45(root: Path, per_class: int = 5) -> list[str]:
    names = []
    for label, cls in enumerate(RESISC_CLASSES):
        for k in range(1, per_class + 1):
            name = f"{cls}_{k:03d}.jpg"
            image(root / "NWPU-RESISC45" / cls / name, shade=60 * label)
            names.append(name)
    return names


def test_resisc45_published_split_lists(tmp_path: Path) -> None:
    names = fake_resisc45(tmp_path)
    lists = {"train": names[0::3] + names[1::3], "val": names[2::3][:2], "test": names[2::3][2:]}
    for split, listed in lists.items():
        (tmp_path / f"resisc45-{split}.txt").write_text("\n".join(listed) + "\n")
    data = {"name": "resisc45", "root": str(tmp_path)}
    check_source(data)
    train, test = build_source(data, train=True), build_source(data, train=False)
    assert train.classes == RESISC_CLASSES == test.classes  # all 45 (here 3) classes in both
    assert sorted(Path(p).name for p, _ in train.samples) == sorted(lists["train"])
    assert sorted(Path(p).name for p, _ in test.samples) == sorted(lists["test"])  # val left out
    for p, label in train.samples + test.samples:
        assert RESISC_CLASSES[label] == Path(p).parent.name
    (tmp_path / "resisc45-test.txt").write_text("beach_999.jpg\n")
    with pytest.raises(UserError, match="lists 1 images, 0 of them"):
        build_source(data, train=False)


def test_resisc45_seeded_split_without_lists(tmp_path: Path) -> None:
    fake_resisc45(tmp_path, per_class=10)
    data = {"name": "resisc45", "root": str(tmp_path)}
    train, test = build_source(data, train=True), build_source(data, train=False)
    assert num_classes(train) == 3 and len(train) == 24 and len(test) == 6
    assert sorted(labels_of(test)) == [0, 0, 1, 1, 2, 2]
    assert not set(train.indices) & set(test.indices)
    assert pickle.loads(pickle.dumps(train))[5][1] == train[5][1]


# -- DMLab -------------------------------------------------------------------------------------------------
def test_dmlab_exported_folders_keep_tfds_labels(tmp_path: Path) -> None:
    labels = [str(i) for i in range(12)]  # numeric order: folder "10" is label 10, not 2
    for split in ("train", "validation", "test"):
        for label in labels:
            if split == "test" and label == "4":
                continue  # a label absent from test must not shift the others
            image(tmp_path / "dmlab" / split / label / f"{split}_{label}.png", shade=int(label))
    data = {"name": "dmlab", "root": str(tmp_path)}
    check_source(data)
    train, test = build_source(data, train=True), build_source(data, train=False)
    assert num_classes(train) == 12 and num_classes(test) == 12
    for dataset in (train, test):
        for p, label in dataset.samples:
            assert label == int(Path(p).parent.name) and "validation" not in p
    assert len(train) == 12 and len(test) == 11
    assert pickle.loads(pickle.dumps(test))[3][1] == test[3][1]  # loader workers may spawn, not fork


def test_dmlab_finetune_and_evaluate(tmp_path: Path, monkeypatch, capsys) -> None:
    """The whole chain reads the exported folders: fine-tune one step, evaluate on test/."""
    for split in ("train", "test"):
        for label in range(3):
            for k in range(2):
                image(tmp_path / "data" / "dmlab" / split / str(label) / f"{k}.png", 80 * label, (48, 36))
    monkeypatch.chdir(tmp_path)
    args = ["data=dmlab", "data.batch_size=4", "data.num_workers=0", "pretrained=none", "model=vit_micro"]
    assert run_cli(["finetune", *args, "trainer.max_steps=1", "hydra.run.dir=ft", *FAST]) == 0
    evaluate = ["checkpoint=ft", "corruptions=false", "robust.enabled=false", "num_workers=0"]
    assert run_cli(["evaluate", *evaluate, "hydra.run.dir=ev"]) == 0
    out = capsys.readouterr().out
    assert "dmlab" in out and (tmp_path / "ev" / "results.json").is_file()
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["sets"]["dmlab"]["images"] == 6
    (tmp_path / "elsewhere").mkdir()  # evaluate reads the data from another root: absent there
    assert run_cli(["evaluate", *evaluate, "data_root=elsewhere", "hydra.run.dir=ev2"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "dmlab is not under data.root=elsewhere")
    assert not (tmp_path / "ev2").exists()


# -- absent ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("sun397", "/SUN397/ClassName.txt"),
        ("resisc45", "/NWPU-RESISC45/<class>/<image>.jpg"),
        ("dmlab", "/dmlab/{train,validation,test}/<label>/*.png"),
    ],
)
def test_absent_dataset_is_one_line_naming_its_layout(
    name: str, layout: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_cli(["finetune", f"data={name}", f"data.root={root}", "pretrained=none"]) == 2
    err = capsys.readouterr().err
    one_line(err, "finetune")
    assert f"{name} is not under data.root={root}" in err and f"{root}{layout}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_absent_dataset_from_a_shell(tmp_path: Path) -> None:
    """As a user meets it: exit status 2 and one line on stderr, nothing written."""
    done = subprocess.run(
        [sys.executable, "-m", "advpt.cli", "finetune", "data=sun397", "data.root=data", "pretrained=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    one_line(done.stderr)
    assert done.stderr.startswith("advpt finetune: error: sun397 is not under data.root=data"), done.stderr
    assert "data/SUN397/ClassName.txt" in done.stderr and list(tmp_path.iterdir()) == []
