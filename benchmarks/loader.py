"""Images/s per loader process: an ImageFolder tree vs the same images as webdataset shards, in one run.

    python benchmarks/loader.py                       # 300 generated JPEGs, MAE's augmentation at 224 px
    python benchmarks/loader.py --size 32             # the CPU recipe's size: JPEGs decoded at 1/8 scale
    python benchmarks/loader.py --workers 2           # also the loaders with 2 processes (images/s in all)

A set of JPEGs of ImageNet's typical sizes (500x375, 375x500, 500x333, 500x500, a few larger; quality
90) is generated from scikit-learn's two sample photographs (random crops, flips, colour shifts) into
a temporary ImageFolder tree (10 classes), then written as shards by ``advpt shards``' writer, files
copied unchanged. Both sides then run the training loader advpt builds for them
(``advpt.data.module.train_loader``) with the method's pre-training augmentation: decoding, random
resized crop to ``--size``, flip (and BYOL's colour operations with ``--views byol``), float pixels.

* imagefolder: ``ImageFolder`` + ``EpochSampler``: a file opened and decoded by Pillow per image.
* shards: the ``data=shards`` stream: tar shards read sequentially through a shuffle buffer, JPEGs
  decoded by ``torchvision.io.decode_jpeg``, or by Pillow at 1/4 or 1/8 scale (``draft()``) while the
  short side stays >= the output size (``decode_min_side``; at 224 px only images of 896+ px are).
* shards, full-size decode: the same stream with ``decode_min_side=0`` (always full-size decoding).

One loader process is one core: torch runs on one thread, the loaders in this process
(``num_workers=0``), and the rate is images per second of this process's CPU time (``--clock cpu``,
the default: other programs on a shared machine do not slow it down) or of wall-clock time
(``--clock wall``). The sides are timed in turn, ``--rounds`` times, and each reports its median, so
drifting machine load hits them alike. The files sit in the page cache after the first round: this
measures decoding and augmentation, not the file system (on a network file system, opening one file
per image costs more again, and shards avoid it).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = [(500, 375)] * 5 + [(375, 500)] * 2 + [(500, 333)] * 2 + [(500, 500), (640, 480), (800, 600)]


def generate(folder: Path, count: int, seed: int = 0) -> int:
    """``count`` JPEGs of ImageNet-like sizes in ``folder/<class>/``; returns their total bytes."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 each
    total = 0
    for i in range(count):
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)  # a random crop of the photograph, resized to the target size
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        out = folder / f"c{i % 10}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.write_bytes(buffer.getvalue())
        total += len(buffer.getvalue())
    return total


def clock(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "cpu" else time.perf_counter


def rate(loader: torch.utils.data.DataLoader, now: Callable[[], float]) -> float:
    """Images per second through one pass of ``loader``."""
    start, images = now(), 0
    for views, _ in loader:
        images += views[0].shape[0]
    return images / (now() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300, help="JPEGs generated (and read per pass)")
    parser.add_argument("--size", type=int, default=224, help="output side of the augmentation")
    parser.add_argument("--views", default="mae", choices=["mae", "byol", "rotnet"])
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="also time loaders with this many processes")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    args = parser.parse_args()

    from advpt.data.module import Transformed, train_loader
    from advpt.data.shards.write import write_shards
    from advpt.data.sources import build_source
    from advpt.data.transforms import pretrain_views

    torch.set_num_threads(1)
    views = pretrain_views(args.views, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tree, shards = Path(tmp) / "tree", Path(tmp) / "shards"
        size = generate(tree, args.images)
        write_shards({"name": "imagefolder", "root": str(tree)}, shards, shard_size=100, log=lambda _: None)
        print(
            f"{args.images} JPEGs ({size / args.images / 1e3:.0f} kB on average, ImageNet-like sizes), "
            f"{args.views} views at {args.size} px, batch {args.batch}, torch threads 1, "
            f"{args.clock} clock, median of {args.rounds} rounds"
        )

        def loader(data: dict, workers: int) -> torch.utils.data.DataLoader:
            source = build_source(
                {**data, "epoch_samples": args.images, "shuffle_buffer": 100},
                train=True,
                image_size=args.size,
            )
            return train_loader(Transformed(source, views, seed=0), args.batch, seed=0, num_workers=workers)

        sides = {
            "imagefolder": {"name": "imagefolder", "root": str(tree)},
            "shards": {"name": "shards", "root": str(shards)},
            "shards, full-size decode": {"name": "shards", "root": str(shards), "decode_min_side": 0},
        }
        settings = [(name, 0) for name in sides]
        if args.workers:
            settings += [(name, args.workers) for name in sides]
        now = clock(args.clock)
        if args.workers and args.clock == "cpu":  # loader processes' CPU time is not this process's
            now = clock("wall")
            print("(--workers: every side timed by the wall clock)")
        loaders = {(name, w): loader(sides[name], w) for name, w in settings}
        for key in loaders:  # warm-up: page cache, imports, first-use costs
            rate(loaders[key], now)
        rates: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
        for _ in range(args.rounds):
            for key, dl in loaders.items():
                rates[key].append(rate(dl, now))
        base = {w: statistics.median(rates[("imagefolder", w)]) for w in {w for _, w in settings}}
        print(f"{'loader':<34}{'processes':>10}{'images/s':>10}{'per process':>13}{'vs imagefolder':>16}")
        for (name, w), values in rates.items():
            median = statistics.median(values)
            per = median / max(w, 1)
            print(f"{name:<34}{max(w, 1):>10}{median:>10.0f}{per:>13.0f}{median / base[w]:>15.2f}x")


if __name__ == "__main__":
    main()
