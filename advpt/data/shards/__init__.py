"""webdataset shards: the writer behind ``advpt shards`` and the reader behind ``data=shards``.

Layout of a folder written by :func:`advpt.data.shards.write.write_shards`::

    DIR/train-000000.tar ...   the training split, in a fixed shuffled order (shards mix the classes)
    DIR/val-000000.tar ...     the evaluation split, in the source's order
    DIR/info.json              written last: classes, sample counts, shard names, skipped files

Each sample is ``<key>.<ext>`` (the image's bytes: the source file as it is, or PNG for decoded
sources such as the built-in digits and CIFAR, or a JPEG when ``max_side``/``quality`` ask for a
re-encoding) and ``<key>.cls`` (the label as decimal text). Keys are the sample's index in its split,
so a rerun of an interrupted write finishes it without duplicates: finished shards are renamed into
place atomically and kept, the others are written again.

Reading: training streams (:class:`ShardStream`): every rank and loader process resamples shards of
its own share with replacement through a shuffle buffer, and stops after a fixed number of batches,
the same on every rank. Evaluation indexes the tar members and reads them by offset
(:class:`ShardSplit`), so every sample is read once, in order, and any subset can be picked.

Files: ``layout`` (the format: names, constants), ``decode`` (image bytes -> tensor), ``locate``
(shard URLs and info.json of a config), ``index`` (the evaluation reader), ``stream`` (the training
reader), ``source`` (what ``advpt.data.sources`` calls), ``encode`` and ``write`` (the writer),
``command`` (``advpt shards``). The writer and the command read any source through
``advpt.data.sources``, which reads shards through this package: they are not imported here (import
``advpt.data.shards.write`` for :func:`write_shards`).
"""

from advpt.data.shards.decode import decode_image
from advpt.data.shards.index import ShardSplit
from advpt.data.shards.layout import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    IMAGE_EXTS,
    INFO,
    PARTIAL,
    PLAN,
    SPLITS,
)
from advpt.data.shards.locate import Located, check_shards
from advpt.data.shards.source import ShardSource, build_source, check_source
from advpt.data.shards.stream import ShardStream, StreamLoader, shard_share, stream_loader

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMAT",
    "IMAGE_EXTS",
    "INFO",
    "PARTIAL",
    "PLAN",
    "SPLITS",
    "Located",
    "ShardSource",
    "ShardSplit",
    "ShardStream",
    "StreamLoader",
    "build_source",
    "check_shards",
    "check_source",
    "decode_image",
    "shard_share",
    "stream_loader",
]
