"""Fine-tuning's data (the labelled splits with the recipe's augmentation) and its LightningModule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from advpt.data import labelled
from advpt.data.module import ResumableData
from advpt.finetune.recipes import build_optimizer, build_scheduler, train_transform
from advpt.models import Encoder

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init
PROBE_HEAD_INIT_STD = 0.01  # MAE's linear-probe head init (main_linprobe.py)
PROBE_NORM_EPS = 1e-6  # MAE's BatchNorm1d before the probe's head


def init_head(vit: nn.Module, std: float = HEAD_INIT_STD) -> None:
    """A fresh classifier head, MAE's way: tiny truncated-normal weights, zero bias."""
    nn.init.trunc_normal_(vit.head.weight, std=std)
    nn.init.zeros_(vit.head.bias)


def probe(vit: nn.Module) -> None:
    """MAE's linear probe on ``vit``: the encoder frozen, its head reading batch-normalised features.

    The norm has no affine part (``BatchNorm1d(D, affine=False)``); its running statistics belong to
    the head and train with it. ``head`` becomes ``Sequential(norm, linear)``; see :func:`fold_probe_norm`.
    """
    init_head(vit, PROBE_HEAD_INIT_STD)
    vit.requires_grad_(False)
    linear = vit.head.requires_grad_(True)
    vit.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=PROBE_NORM_EPS), linear)


def fold_probe_norm(state: Mapping[str, Tensor], eps: float = PROBE_NORM_EPS) -> dict[str, Tensor]:
    """A probe's state dict with its eval-mode norm folded into the linear head: a plain timm ``head``.

    W' = W / sqrt(var + eps), b' = b - W'·mean, computed in float64, stored in the head's dtype.
    """
    state = dict(state)
    mean, var = state.pop("head.0.running_mean").double(), state.pop("head.0.running_var").double()
    state.pop("head.0.num_batches_tracked", None)
    weight, bias = state.pop("head.1.weight"), state.pop("head.1.bias")
    folded = weight.double() / torch.sqrt(var + eps)
    state["head.weight"] = folded.to(weight.dtype)
    state["head.bias"] = (bias.double() - folded @ mean).to(bias.dtype)
    return state


class FinetuneData(ResumableData):
    """The labelled training split with the recipe's augmentation; the test split, if any, for val/top1."""

    def __init__(
        self, data: Mapping[str, Any], optim: Mapping[str, Any], image_size: int, seed: int = 0
    ) -> None:
        from advpt.data.sources import build_source, num_classes

        super().__init__()
        self.cfg, self.optim, self.image_size, self.seed = dict(data), dict(optim), image_size, seed
        self.train_source = build_source(self.cfg, train=True, image_size=image_size)
        self.val_source = build_source(self.cfg, train=False, image_size=image_size)
        self.num_classes = num_classes(self.train_source)
        # data.labels_per_class / label_fraction: fine-tune on a seeded, class-balanced share of the labels
        self.labelled: dict[str, Any] | None = None
        if labelled.wanted(self.cfg):
            from torch.utils.data import Subset

            indices, self.labelled = labelled.subset(self.cfg, self.train_source, seed)
            self.train_source = Subset(self.train_source, indices)

    def train_dataloader(self) -> DataLoader:
        from advpt.data.module import Transformed
        from advpt.data.transforms import Views

        # One view per image, batched as ([images], labels) like pre-training (ImagesPerSecond reads it);
        # shuffle order and augmentations follow (seed, epoch), as in pre-training, so resuming repeats them.
        views = Views([train_transform(self.optim, self.image_size)])
        batch_size = int(self.cfg["batch_size"])
        return self.resumable_loader(
            Transformed(self.train_source, views, seed=self.seed),
            batch_size=batch_size,
            seed=self.seed,
            num_workers=self.loader_workers(self.cfg.get("num_workers"), batch_size, self.image_size),
        )

    def val_dataloader(self) -> DataLoader | list:
        from advpt.data.module import Transformed
        from advpt.data.transforms import eval_transform

        if self.val_source is None:
            return []  # no test split: no val/top1
        from advpt.data.skipping import eval_loader

        # Each rank scores its share, every image once (val/top1 is synced); unreadable images dropped.
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = Transformed(self.val_source, eval_transform(self.image_size))
        batch_size = int(self.cfg["batch_size"])
        workers = self.loader_workers(self.cfg.get("num_workers"), batch_size, self.image_size)
        return eval_loader(dataset, batch_size, workers, rank=rank, world=world, persistent=True)


class FineTuner(L.LightningModule):
    """timm ViT classifier on [0, 1] pixels, trained with the recipe's targets, optimiser and schedule."""

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        num_classes: int,
        layer_decay: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        activation_checkpointing: bool = False,
    ) -> None:
        from timm.data import Mixup
        from torchmetrics.classification import MulticlassAccuracy

        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg, self.num_classes = dict(optim), int(num_classes)
        self.layer_decay, self.batch_size, self.seed = float(layer_decay), int(batch_size), int(seed)
        self.net = Encoder.from_config(model, self.num_classes, drop_path_rate=float(optim["drop_path_rate"]))
        self.frozen_encoder = bool(optim.get("frozen_encoder", False))
        if self.frozen_encoder:
            probe(self.net.vit)
        else:
            init_head(self.net.vit)
        mixup, cutmix = float(optim.get("mixup", 0.0)), float(optim.get("cutmix", 0.0))
        self.smoothing = float(optim.get("label_smoothing", 0.0))
        self.mixup = (
            Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                label_smoothing=self.smoothing,
                num_classes=self.num_classes,
            )
            if mixup > 0 or cutmix > 0
            else None
        )
        self.val_top1 = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.validated_at: int | None = None
        self.activation_checkpointing, self.sharded = bool(activation_checkpointing), False
        self.train()

    def train(self, mode: bool = True) -> FineTuner:
        """A frozen encoder stays in eval mode (no dropout, drop path, statistics); its head follows ``mode``."""
        super().train(mode)
        if self.frozen_encoder:
            self.vit.eval()
            self.vit.head.train(mode)
        return self

    def configure_model(self) -> None:
        """``activation_checkpointing=true`` and ``trainer.strategy=fsdp`` (see advpt.training.sharding)."""
        from advpt.training.sharding import checkpoint_activations, shard

        if self.sharded:  # Lightning may call this hook again
            return
        if self.activation_checkpointing:
            checkpoint_activations(self)
        if self._device_mesh is not None:
            shard(self, self._device_mesh["data_parallel"], str(self.trainer.precision))
            self.sharded = True

    @property
    def vit(self) -> nn.Module:
        return self.net.vit

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def classifier_state(self, state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The timm classifier's state dict to export (``state``: gathered beforehand under FSDP).

        A linear probe's norm is folded into its head, so the file loads into ``timm.create_model``.
        """
        from advpt.training.sharding import full_state

        state = full_state(self.vit) if state is None else dict(state)
        return fold_probe_norm(state, self.vit.head[0].eps) if self.frozen_encoder else state

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        from advpt.data.module import seed_batch

        # mixup, cutmix, drop path follow (seed, epoch, batch): resuming anywhere repeats them
        seed_batch(self.seed, self.current_epoch, batch_idx, self.global_rank)

    def targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup / cutmix (timm, on even batches) and label smoothing."""
        from timm.data.mixup import mixup_target

        if self.mixup is not None and images.shape[0] % 2 == 0:
            return self.mixup(images, labels)
        if self.smoothing > 0:
            return images, mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.smoothing)
        return images, labels

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        from advpt.training.schedule import soft_cross_entropy

        (images,), labels = batch
        images, targets = self.targets(images, labels)
        loss = soft_cross_entropy(self(images), targets).mean()
        self.last_loss = loss.detach()  # read before the optimiser step (StopOnNonFinite)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        self.log("train/lr", max(g["lr"] for g in self.optimizers().param_groups), batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_top1(logits, labels)
        loss = F.cross_entropy(logits.float(), labels)
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=self.trainer.world_size > 1)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=images.shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    @property
    def lr(self) -> float:
        """Absolute peak lr: the recipe's lr at ``lr_batch`` images, scaled linearly to the batch."""
        from advpt.training.schedule import effective_batch

        batch = effective_batch(self, self.batch_size)
        return float(self.optim_cfg["lr"]) * batch / float(self.optim_cfg["lr_batch"])

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.vit, self.optim_cfg, self.lr, self.layer_decay)
        scheduler = build_scheduler(
            optimizer, self.optim_cfg, max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are driven by the update count; the update at step t used lr(t).
        scheduler.step_update(num_updates=self.global_step)
