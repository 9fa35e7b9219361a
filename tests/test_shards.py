"""webdataset shards: ``advpt shards`` writes them (resumably), ``data=shards`` reads them; unreadable
images are skipped and counted (shards and ImageFolder trees alike); ranks split the data as promised."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_cli
from PIL import Image

from advpt.data.module import Transformed
from advpt.data.shards import (
    INFO,
    ShardSource,
    ShardSplit,
    ShardStream,
    check_source,
    shard_share,
    stream_loader,
)
from advpt.data.shards.write import write_shards
from advpt.data.skipping import eval_loader, unreadable
from advpt.data.sources import Digits, build_source
from advpt.data.transforms import eval_transform
from advpt.errors import UserError

ADVPT = str(Path(sys.executable).parent / "advpt")
BUILTIN = {"name": "builtin"}
FAST = ["model=vit_micro", "trainer.enable_progress_bar=false", "data.batch_size=16", "data.num_workers=0"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """The built-in digits as shards of 500 (1437 training images: 3 shards; 360 evaluation: 1)."""
    out = tmp_path_factory.mktemp("shards") / "digits"
    write_shards(BUILTIN, out, shard_size=500, log=lambda _: None)
    return out


def copy_of(written: Path, tmp_path: Path) -> Path:
    out = tmp_path / "digits"
    shutil.copytree(written, out)
    return out


def shard_data(root: Path, **extra) -> dict:
    return {"name": "shards", "root": str(root), "shuffle_buffer": 100, "batch_size": 16, **extra}


def append(shard: Path, members: dict[str, bytes]) -> None:
    """Add files to a finished shard (as a damaged or hand-edited shard would hold them)."""
    with tarfile.open(shard, "a") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def members(shard: Path | str) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def identity(image):
    return image


# -- writing --------------------------------------------------------------------------------------
def test_writer_and_reader_round_trip_images_and_labels(written: Path) -> None:
    info = json.loads((written / INFO).read_text())
    names = sorted(p.name for p in written.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert info["splits"]["train"]["samples"] == 1437 and info["splits"]["val"]["samples"] == 360
    assert [s["samples"] for s in info["splits"]["train"]["shards"]] == [500, 500, 437]
    assert info["classes"] == [str(i) for i in range(10)]
    # The training shards hold the split in a shuffled order (mixed classes); keys are source indices.
    first = ShardSplit([str(written / "train-000000.tar")], info["classes"])
    assert len(set(first.targets[:50])) == 10

    for split, train in (("val", False), ("train", True)):
        digits = Digits(train=train)
        urls = [str(written / s["name"]) for s in info["splits"][split]["shards"]]
        read = ShardSplit(urls, info["classes"])
        keys = [int(name.split(".")[0]) for u in urls for name in members(u) if name.endswith(".cls")]
        assert sorted(keys) == list(range(len(digits))) and len(read) == len(digits)
        for k, i in enumerate(keys):
            image, label = read[k]
            assert label == digits.targets[i]
            assert torch.equal(image, digits.images[i]), (split, i)  # PNG: bit-exact


def test_an_interrupted_write_finishes_without_duplicates(written: Path, tmp_path: Path) -> None:
    out = copy_of(written, tmp_path)
    kept = out / "train-000000.tar"
    stamp = kept.stat().st_mtime_ns
    # Interrupted while writing shard 1: it is still a partial file, shard 2 and info.json are not there.
    (out / "train-000001.tar").rename(out / "train-000001.tar.partial")
    with open(out / "train-000001.tar.partial", "r+b") as f:
        f.truncate(20_000)
    (out / "train-000002.tar").unlink()
    (out / INFO).unlink()
    with pytest.raises(UserError, match="holds no readable info.json"):
        check_source(shard_data(out))  # an unfinished write is not read

    info = write_shards(BUILTIN, out, shard_size=500, log=lambda _: None)
    assert kept.stat().st_mtime_ns == stamp  # finished shards are kept, not rewritten
    assert not list(out.glob("*.partial"))
    keys = [name for p in sorted(out.glob("train-*.tar")) for name in members(p)]
    assert len(keys) == len(set(keys)) == 2 * 1437
    assert info == json.loads((written / INFO).read_text())
    for name in ("train-000001.tar", "train-000002.tar"):
        assert (out / name).read_bytes() == (written / name).read_bytes()

    with pytest.raises(UserError, match="other settings \\(shard_size"):
        write_shards(BUILTIN, out, shard_size=400, log=lambda _: None)


def test_shards_command_writes_at_least_two_tar_files(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["shards", "out=D"]) == 0
    assert len(list((tmp_path / "D").glob("*.tar"))) >= 2 and (tmp_path / "D" / INFO).is_file()
    assert "next: advpt pretrain data=shards data.root=D" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "needs out=DIR"),
        (["out=D", "shard_size=0"], "shard_size=0 is invalid"),
        (["out=D", "quality=101"], "quality=101 is invalid"),
        (["out=D", "data=imagefolder", "data.root=/no/such"], "data.root=/no/such does not exist"),
        (["out=D", "data=shards", "data.root=/no/such"], "already sharded"),
    ],
)
def test_shards_command_bad_input_is_one_line(args, needle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["shards", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, None, needle)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_other_files_is_not_written_into(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no `advpt shards` output"):
        write_shards(BUILTIN, tmp_path, log=lambda _: None)


# -- reading: what each rank gets ------------------------------------------------------------------
def test_evaluation_shares_are_disjoint_and_cover_every_sample_once(written: Path, monkeypatch) -> None:
    split = build_source(shard_data(written), train=False)
    assert isinstance(split, ShardSplit) and len(split) == 360
    split[0]
    opened = split._files[0]
    with monkeypatch.context() as m:  # in a forked loader process: its own file, not the parent's offset
        m.setattr(os, "getpid", lambda: -1)
        split[1]
        assert split._files[0] is not opened
    seen = []
    for rank in range(3):
        loader = eval_loader(
            Transformed(split, identity), batch_size=16, num_workers=2 if rank == 1 else 0, rank=rank, world=3
        )
        mine = [
            tuple(x.flatten().tolist()) + (int(y),)
            for images, labels in loader
            for x, y in zip(images, labels, strict=True)
        ]
        assert len(mine) in (120,)
        seen += mine
    everything = [tuple(x.flatten().tolist()) + (y,) for x, y in (split[i] for i in range(len(split)))]
    assert sorted(seen) == sorted(everything)


def test_training_streams_give_every_rank_the_same_number_of_full_batches(written: Path) -> None:
    source = build_source(shard_data(written, epoch_samples=200), train=True)
    assert isinstance(source, ShardSource)
    counts = []
    for rank, workers in ((0, 0), (1, 2)):
        loader = stream_loader(
            source, identity, batch_size=16, seed=0, num_workers=workers, rank=rank, world=2
        )
        batches = list(loader)
        assert len(loader) == 6 == len(batches)  # 200 // 2 ranks // 16
        assert all(images.shape == (16, 3, 32, 32) and labels.shape == (16,) for images, labels in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1]
    # Shards are dealt to the loader processes of all ranks without overlap while there are enough.
    urls = [f"s{i}" for i in range(8)]
    shares = [shard_share(urls, 0, 3, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(u for s in shares for u in s) == urls
    assert shard_share(urls[:3], 0, 0, 1, 2, 1, 2) == shard_share(urls[:3], 0, 0, 1, 2, 0, 2)  # ranks only


def test_a_resumed_epoch_owes_the_rest_as_a_fresh_reproducible_draw(written: Path) -> None:
    source = build_source(shard_data(written, epoch_samples=160), train=True)

    def epoch(skip_batches: int) -> list[torch.Tensor]:
        stream = ShardStream(source, identity, batch_size=16, seed=3)
        stream.epoch, stream.skip = 1, skip_batches * 16
        return [labels for _, labels in stream]

    whole, resumed = epoch(0), epoch(4)
    assert len(whole) == 10 and len(resumed) == 6  # the stopped run trained 4 of the epoch's 10
    assert all(torch.equal(a, b) for a, b in zip(resumed, epoch(4), strict=True))  # reproducible
    assert not torch.equal(torch.cat(resumed), torch.cat(whole[4:]))  # not a replay of the stopped run


# -- unreadable input ------------------------------------------------------------------------------
def test_corrupt_and_incomplete_samples_in_shards_are_skipped_and_counted(
    written: Path, tmp_path: Path
) -> None:
    out = copy_of(written, tmp_path)
    append(out / "val-000000.tar", {"900000000.jpg": b"\xff\xd8\xff not a jpeg", "900000000.cls": b"3"})
    append(out / "val-000000.tar", {"900000001.cls": b"4"})  # no image
    split = build_source(shard_data(out), train=False)
    assert len(split) == 361 and split.incomplete == 1
    dataset = Transformed(split, identity)
    loader = eval_loader(dataset, batch_size=64)
    assert sum(len(labels) for _, labels in loader) == 360
    assert unreadable(dataset) == 2

    for shard in out.glob("train-*.tar"):  # one in every training shard, so the epoch meets some
        append(shard, {"900000002.png": b"\x89PNG broken", "900000002.cls": b"1"})
    # 20 batches read ~600 samples (the buffer fills as it yields): past the end of a 500-sample shard
    source = build_source(shard_data(out, epoch_samples=320, shuffle_buffer=600), train=True)
    loader = stream_loader(source, identity, batch_size=16, seed=0, num_workers=0)
    assert [len(labels) for _, labels in loader] == [16] * 20  # batches stay full
    assert unreadable(loader) >= 1


def test_unreadable_images_in_an_imagefolder_tree_are_skipped_and_counted(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (12, 10), (60 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = {"name": "imagefolder", "root": str(tmp_path)}
    source = build_source(data, train=True)
    assert len(source) == 7

    train = Transformed(
        source, eval_transform(8), seed=0
    )  # training: the next readable image takes its place
    from advpt.data.module import train_loader

    batches = list(train_loader(train, batch_size=7, seed=0, num_workers=0))
    assert [len(labels) for _, labels in batches] == [7] and unreadable(train) == 1

    evaluated = Transformed(source, eval_transform(8))  # evaluation: dropped, every readable image once
    labels = [int(y) for _, ys in eval_loader(evaluated, batch_size=4, num_workers=2) for y in ys]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1] and unreadable(evaluated) == 1

    info = write_shards(data, tmp_path.parent / "tree-shards", shard_size=4, log=lambda _: None)
    assert info["splits"]["train"]["samples"] == 6
    assert [Path(p).name for p in info["splits"]["train"]["skipped"]] == ["broken.jpg"]


def test_imagenet_layout_files_copied_as_they_are_unless_asked(tmp_path: Path) -> None:
    tree = tmp_path / "imagenet"
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            (tree / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (80 * i, 90, 0)).save(
                    tree / split / cls / f"{cls}_{i}.JPEG", quality=95
                )
    data = {"name": "imagefolder", "root": str(tree)}
    info = write_shards(data, tmp_path / "same", shard_size=4, log=lambda _: None)
    assert info["classes"] == ["n01440764", "n01443537"]
    assert [info["splits"][s]["samples"] for s in ("train", "val")] == [6, 4]
    sources = {p.read_bytes() for p in tree.rglob("*.JPEG")}
    copied = set()
    for shard in (tmp_path / "same").glob("*.tar"):
        with tarfile.open(shard) as tar:
            copied |= {tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    assert copied == sources  # byte for byte

    write_shards(data, tmp_path / "small", shard_size=4, max_side=20, quality=50, log=lambda _: None)
    val = ShardSplit([str(tmp_path / "small" / "val-000000.tar")], info["classes"])
    assert [tuple(val[i][0].shape) for i in range(len(val))] == [(3, 15, 20)] * 4
    assert sorted(val.targets) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "root,needle",
    [
        ("/no/such/dir", "data.root=/no/such/dir does not exist"),
        ("EMPTY", "holds no readable info.json"),
        ("'/no/such/train-{000000..000003}.tar'", "cannot read /no/such/info.json"),
    ],
)
def test_a_missing_root_is_one_line(root, needle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    if root == "EMPTY":
        (tmp_path / "EMPTY").mkdir()
    assert run_cli(["pretrain", "data=shards", f"data.root={root}", *FAST]) == 2
    err = capsys.readouterr().err
    one_line(err, None, needle)


def test_an_unreadable_shard_is_one_line(written: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = copy_of(written, tmp_path)
    (out / "train-000001.tar").write_bytes(b"this is not a tar file" * 100)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", "data=shards", f"data.root={out}", *FAST]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "train-000001.tar is not a readable tar file")


def test_shard_urls_as_a_brace_pattern(written: Path) -> None:
    source = ShardSource(shard_data(str(written / "train-{000000..000002}.tar")))
    assert len(source.urls) == 3 and source.size == 1437 and source.num_classes == 10
    val = build_source(shard_data(str(written / "train-{000000..000001}.tar")), train=False)
    assert len(val) == 360  # the evaluation shards named in the info.json beside them


def test_shards_read_through_urls(written: Path, tmp_path: Path) -> None:
    """Remote shards as webdataset opens them (``pipe:``, like ``https://`` or ``pipe:aws s3 cp ...``)."""
    data = shard_data(None, epoch_samples=64, cache=str(tmp_path / "cache"))
    data["root"] = f"pipe:cat {written}/train-{{000000..000002}}.tar"
    check_source(data)
    source = build_source(data, train=True)
    assert source.urls[0] == f"pipe:cat {written}/train-000000.tar" and source.num_classes == 10
    assert [len(labels) for _, labels in stream_loader(source, identity, 16, seed=0, num_workers=0)] == [
        16
    ] * 4
    val = build_source(data, train=False)  # indexed: copied into the cache first
    assert len(val) == 360 and [
        p.name.endswith("val-000000.tar") for p in (tmp_path / "cache").iterdir()
    ] == [True]


# -- the commands, as users run them -------------------------------------------------------------
def advpt(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([ADVPT, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_a_killed_write_is_finished_by_the_same_command(tmp_path: Path) -> None:
    import time

    args = ["shards", "out=D", "shard_size=40"]  # 36 training and 9 evaluation shards
    proc = subprocess.Popen(
        [ADVPT, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "D" / "train-000002.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()  # no chance to clean up
    proc.wait()
    assert not (tmp_path / "D" / INFO).exists()
    done = advpt(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = advpt(["shards", "out=E", "shard_size=40"], tmp_path)  # the same write, never interrupted
    assert done.returncode == 0, done.stderr[-3000:]
    written, clean = sorted((tmp_path / "D").iterdir()), sorted((tmp_path / "E").iterdir())
    assert [p.name for p in written] == [p.name for p in clean] and len(written) == 2 + 36 + 9
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(written, clean, strict=True))


@pytest.mark.slow
def test_pretrain_finetune_evaluate_from_shards_with_a_corrupt_sample(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "small"  # small shards: a few steps reach the corrupt sample at the end of each
    write_shards(BUILTIN, out, shard_size=100, log=lambda _: None)
    for shard in out.glob("train-*.tar"):  # an undecodable image appended to every training shard
        append(shard, {"900000002.jpg": b"\xff\xd8\xff broken", "900000002.cls": b"1"})
    append(out / "val-000000.tar", {"900000003.jpg": b"\xff\xd8\xff broken", "900000003.cls": b"2"})
    data = ["data=shards", f"data.root={out}", "data.shuffle_buffer=600"]
    done = advpt(["pretrain", *data, *FAST, "trainer.max_steps=3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "advpt: skipped" in done.stdout and "unreadable or incomplete sample" in done.stdout, done.stdout
    (metrics,) = tmp_path.glob("outputs/pretrain/*/*/metrics.csv")
    rows = metrics.read_text().splitlines()
    column = rows[0].split(",").index("data/skipped")
    counts = [row.split(",")[column] for row in rows[1:]]
    assert float([c for c in counts if c][-1]) >= 1  # the last training row (monitor=knn's have none)

    done = advpt(["finetune", *data, *FAST, "trainer.max_steps=3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.chdir(tmp_path)  # evaluating and resuming in this process: the launches are tested above
    assert run_cli(["evaluate", "subset_max_images=4", "robust.max_images=8", "robust.steps=1"]) == 0
    (results,) = tmp_path.glob("outputs/evaluate/*/results.json")
    results = json.loads(results.read_text())
    assert results["sets"]["shards"]["images"] == 360  # the undecodable one skipped, every other once
    assert "shards: 1 unreadable or incomplete image skipped" in results["warnings"]

    # Resumed from the checkpoint of a run stopped at step 3, mid-epoch: it owes the epoch's rest.
    (ckpt,) = tmp_path.glob("outputs/pretrain/*/*/checkpoints/last.ckpt")
    assert run_cli(["pretrain", *data, *FAST, "trainer.max_steps=5", f"resume={ckpt}"]) == 0
    resumed = max(
        tmp_path.glob("outputs/pretrain/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    state = torch.load(resumed, weights_only=False)
    assert state["global_step"] == 5
    assert state["PretrainData"] == {"epoch": 0, "batches": 5}  # the epoch's position carried on


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_ddp_processes_train_from_shards(written: Path, tmp_path: Path) -> None:
    data = ["data=shards", f"data.root={written}", "data.shuffle_buffer=200"]
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=2"]
    done = advpt(["pretrain", *data, *FAST, *ddp], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = advpt(["finetune", *data, *FAST, *ddp], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = tmp_path.glob("outputs/finetune/*/*/run.json")
    assert json.loads(record.read_text())["steps"] == 2
