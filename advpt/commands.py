"""The commands of ``advpt``: name -> the module that runs it (``run(cfg)``) and its one-line help.

Torch-free and import-free (but for the torch-free table of methods): the command line, the workers of a
multi-process run and the help read it before anything heavy is imported.
"""

from __future__ import annotations

from typing import NamedTuple

from advpt.method_table import METHOD_TABLE


class Command(NamedTuple):
    module: str  # imported only once the config has passed its checks
    help: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "advpt.pretrain",
        f"adversarial / nominal self-supervised pre-training (method={'|'.join(METHOD_TABLE)})",
    ),
    "finetune": Command(
        "advpt.finetune",
        "fine-tune a pre-trained encoder (AdamW + layer-wise lr decay), transfer it (optim=sgd_transfer) "
        "or probe it frozen (optim=linear_probe); data.labels_per_class=N for scarce labels",
    ),
    "evaluate": Command(
        "advpt.evaluate",
        "clean, shifted and robust top-1 of a fine-tuned model (suite=auto|imagenet_variants); results.json",
    ),
    "study": Command(
        "advpt.study",
        "a whole grid of the paper (pretrain, scratch, finetune, evaluate, transfer) and its report; resumable",
    ),
    "report": Command(
        "advpt.report",
        "the paper's figures and tables (Fig. 1, 2, 3, 5, Table 1) from the runs found under runs=[DIR,...]",
    ),
    "visualize": Command(
        "advpt.visualize",
        "PCA of patch-embedding filters, one panel per checkpoint (paper Fig. 4); filters.png",
    ),
    "export": Command(
        "advpt.export",
        "a fine-tuned model as a program that needs only torch: model.pt2 (torch.export) + model.json in out=DIR",
    ),
    "shards": Command(
        "advpt.data.shards.command",
        "write a dataset's splits as webdataset shards + info.json (train with data=shards data.root=DIR)",
    ),
}

# Commands whose folder holds other runs' results: never removed on an error.
KEEPS_FOLDER = {"study", "report"}
