"""The ``finetune`` command: a pre-trained encoder plus a fresh head, trained on labels.

Three recipes (the ``optim`` group): MAE's fine-tuning with layer-wise lr decay (paper §4.2, App. C),
Steiner et al.'s SGD transfer (App. E) and MAE's linear probe of the frozen encoder; on a class-balanced
share of the labels where ``data.labels_per_class`` asks for one. The result is a plain timm classifier,
``model.safetensors`` + ``model.json``, that loads with ``timm.create_model(name, **kwargs)``.

``pretrained``: find, check and load the encoder; ``recipes``: optimiser, schedule, augmentation;
``module``: the data and the LightningModule; ``command``: check, fit, export, run.
"""

from advpt.finetune.command import (
    SCRATCH_MODEL,
    check,
    export_classifier,
    fit,
    loaded,
    run,
    summarise,
)
from advpt.finetune.module import HEAD_INIT_STD, FinetuneData, FineTuner, init_head
from advpt.finetune.pretrained import (
    Pretrained,
    find_latest,
    load_backbone,
    load_encoder_state,
    resolve_pretrained,
)
from advpt.finetune.recipes import (
    OPTIMIZERS,
    TRANSFORMS,
    build_optimizer,
    build_scheduler,
    train_transform,
)
from advpt.models import architecture, model_config

__all__ = [
    "HEAD_INIT_STD",
    "OPTIMIZERS",
    "SCRATCH_MODEL",
    "TRANSFORMS",
    "FineTuner",
    "FinetuneData",
    "Pretrained",
    "architecture",
    "build_optimizer",
    "build_scheduler",
    "check",
    "export_classifier",
    "find_latest",
    "fit",
    "init_head",
    "load_backbone",
    "load_encoder_state",
    "loaded",
    "model_config",
    "resolve_pretrained",
    "run",
    "summarise",
    "train_transform",
]
