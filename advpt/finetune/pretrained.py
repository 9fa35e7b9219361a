"""The ``finetune`` command: a pre-trained encoder plus a fresh head, trained on labels.

Two recipes (the ``optim`` group): MAE's fine-tuning with layer-wise lr decay (paper §4.2, App. C)
and Steiner et al.'s SGD transfer (App. E). The result is a plain timm classifier,
``model.safetensors`` + ``model.json``, that loads with ``timm.create_model(name, **kwargs)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from advpt.config import CONF_DIR, check_arguments, check_run, parse_number
from advpt.data.module import ResumableData
from advpt.errors import UserError
from advpt.models import IMAGENET_MEAN, IMAGENET_STD, Encoder, timm_kwargs
from advpt.runs import number, read_record, shown, summary, write_record

SCRATCH_MODEL = "vit_mini_patch8_32"  # pretrained=none without model=: the CPU recipe's model
HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init
OPTIMIZERS = ("adamw", "momentum")
TRANSFORMS = ("randaugment", "resize_flip")
# timm_kwargs() fills these from the model config; the rest of encoder.json's kwargs is model.kwargs.
_DERIVED_KWARGS = ("img_size", "patch_size", "num_classes", "global_pool")


# -- where the encoder comes from --------------------------------------------------------------
@dataclass(frozen=True)
class Pretrained:
    """The weights file to start from (``None``: from scratch) and the model config that built it."""

    path: Path | None
    model: dict[str, Any]


def model_config(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model group (name, img_size, patch_size, kwargs) behind ``timm.create_model(name, **kwargs)``."""
    return {
        "name": name,
        "img_size": int(kwargs["img_size"]),
        "patch_size": int(kwargs["patch_size"]),
        "kwargs": {k: v for k, v in kwargs.items() if k not in _DERIVED_KWARGS},
    }


def _architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": model["name"], **timm_kwargs(model)}


def find_latest() -> Path:
    """``pretrained=latest``: the encoder of the newest finished pretrain run here (``advpt.runs``)."""
    from advpt.runs import resolve_latest

    return resolve_latest("finetune").resolve()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # not a torch file, truncated, ...
        raise UserError(
            f"pretrained={path} is not a readable Lightning checkpoint ({type(e).__name__})"
        ) from None


def _checkpoint_encoder(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A pretrain checkpoint's ``encoder.vit.*`` weights under timm's names, and its model config."""
    ckpt = _load_checkpoint(path)
    prefix = "encoder.vit."
    state = {k[len(prefix) :]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith(prefix)}
    model = (ckpt.get("hyper_parameters") or {}).get("model")
    try:
        if state:
            return state, model_config(model["name"], timm_kwargs(model))
    except (KeyError, TypeError, ValueError):
        pass
    raise UserError(f"pretrained={path} is not a checkpoint of `advpt pretrain` (no encoder.vit.* weights)")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # safe_open is not iterable, hence keys()
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise UserError(
            f"pretrained={path} is not a readable safetensors file ({type(e).__name__})"
        ) from None


def _check_matches(path: Path, shapes: Mapping[str, tuple[int, ...]], model: Mapping[str, Any]) -> None:
    """Every weight the ViT needs is there with its shape; the head is the only part left out."""
    import timm

    try:
        with torch.device("meta"):  # shapes only, nothing allocated
            vit = timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
    except Exception as e:  # an unknown architecture or argument
        raise UserError(f"pretrained={path}: cannot build its model {model['name']} ({e})") from None
    wanted = {k: tuple(v.shape) for k, v in vit.state_dict().items() if not k.startswith("head.")}
    given = {k: s for k, s in shapes.items() if not k.startswith("head.")}
    missing, unexpected = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    wrong = sorted(k for k in wanted.keys() & given.keys() if wanted[k] != given[k])
    if missing:
        what = f"missing {missing[0]}"
    elif unexpected:
        what = f"unexpected {unexpected[0]}"
    elif wrong:
        what = f"{wrong[0]} has shape {list(given[wrong[0]])}, the model wants {list(wanted[wrong[0]])}"
    else:
        return
    raise UserError(f"pretrained={path} does not fit its model {model['name']} ({what})")


def resolve_pretrained(value: Any) -> Pretrained:
    """Turn ``pretrained=`` into the file to read and its model config; one line on anything unusable."""
    text = "none" if value is None else str(value)
    if text.lower() == "none":
        return Pretrained(None, {})
    path = find_latest() if text == "latest" else Path(text).expanduser().resolve()
    if not path.exists():
        raise UserError(
            f"pretrained={text} does not exist (give a pretrain run directory, its encoder.safetensors or "
            "checkpoints/last.ckpt, latest or none)"
        )
    if path.is_dir():
        for candidate in (path / "encoder.safetensors", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise UserError(
                f"pretrained={text} is a folder without encoder.safetensors or checkpoints/last.ckpt "
                "(is it an `advpt pretrain` run directory?)"
            )
    if path.suffix == ".ckpt":
        state, model = _checkpoint_encoder(path)
        _check_matches(path, {k: tuple(v.shape) for k, v in state.items()}, model)
        return Pretrained(path, model)
    if path.suffix == ".safetensors":
        spec_file = path.with_name("encoder.json")
        if not spec_file.is_file():
            raise UserError(f"pretrained={text} has no encoder.json beside it (written by `advpt pretrain`)")
        try:
            spec = json.loads(spec_file.read_text())
            model = model_config(spec["name"], spec["kwargs"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{spec_file} is not an encoder description (name, kwargs)") from None
        _check_matches(path, _safetensors_shapes(path), model)
        return Pretrained(path, model)
    raise UserError(
        f"pretrained={text} is not a pretrain run directory, an encoder .safetensors or a Lightning .ckpt"
    )


def load_encoder_state(path: Path) -> dict[str, Tensor]:
    """The encoder's timm state dict from ``encoder.safetensors`` or a pretrain ``last.ckpt``."""
    if path.suffix == ".ckpt":
        return _checkpoint_encoder(path)[0]
    from safetensors.torch import load_file

    return load_file(str(path))


def load_backbone(vit: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load everything but the head, strictly: a missing or extra encoder weight is an error."""
    missing, unexpected = vit.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False
    )
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise UserError(f"the pre-trained weights do not fit the model ({bad[0]})")


def init_head(vit: nn.Module) -> None:
    nn.init.trunc_normal_(vit.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(vit.head.bias)


# -- the recipe: optimiser, schedule, augmentation -----------------------------------------------
def build_optimizer(
    vit: nn.Module, optim: Mapping[str, Any], lr: float, layer_decay: float
) -> torch.optim.Optimizer:
    """timm's optimiser on the timm ViT itself, so its layer ids (``group_matcher``) see timm's names.

    With layer decay each group carries an ``lr_scale`` (γ^k) that timm's scheduler multiplies in;
    biases, norms, ``pos_embed`` and ``cls_token`` get no weight decay.
    """
    from timm.optim import create_optimizer_v2

    extra = (
        {"betas": tuple(optim["betas"])}
        if optim["opt"] == "adamw"
        else {"momentum": float(optim["momentum"])}
    )
    return create_optimizer_v2(
        vit,
        opt=optim["opt"],
        lr=lr,
        weight_decay=float(optim["weight_decay"]),
        layer_decay=float(layer_decay) if optim["opt"] == "adamw" else None,
        **extra,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], total_steps: int) -> Any:
    """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine to ``min_lr`` (per step).

    As in MAE and big_vision, the cosine spans the steps after the warm-up (``warmup_prefix``), so the
    peak lr is reached exactly when the warm-up ends: lr(t) = lr·t/W for t < W.
    """
    from advpt.methods.base import warmup_cosine

    return warmup_cosine(optimizer, total_steps, float(optim["warmup_fraction"]), float(optim["min_lr"]))


class _Unnormalize(nn.Module):
    """Back to [0, 1] pixels after timm's transform: the model normalises by itself."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.std + self.mean).clamp_(0, 1)


def train_transform(optim: Mapping[str, Any], size: int) -> Any:
    """The recipe's training augmentation; output pixels are float in [0, 1]."""
    from torchvision.transforms import v2 as T

    if optim["transform"] == "resize_flip":
        from advpt.data.transforms import BICUBIC

        return T.Compose(
            [
                T.ToImage(),
                T.Resize((size, size), interpolation=BICUBIC, antialias=True),
                T.RandomHorizontalFlip(),
                T.ToDtype(torch.float32, scale=True),
            ]
        )
    from timm.data import create_transform

    from advpt.data.transforms import with_safe_posterize

    # timm's pipeline as MAE calls it, with ImageNet statistics so that RandAugment's fill colour and the
    # noise of random erasing are MAE's; undone at the end, erased pixels clipped into [0, 1].
    timm_transform = create_transform(
        size,
        is_training=True,
        scale=tuple(float(v) for v in optim.get("scale", (0.08, 1.0))),
        hflip=float(optim.get("hflip", 0.5)),
        auto_augment=optim["auto_augment"] or None,
        color_jitter=None,
        interpolation="bicubic",
        re_prob=float(optim["re_prob"]),
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    with_safe_posterize(timm_transform)
    return T.Compose([T.ToPILImage(), timm_transform, _Unnormalize(IMAGENET_MEAN, IMAGENET_STD)])


# -- data and module ------------------------------------------------------------------------------
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

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(
            dataset,
            batch_size=int(self.cfg["batch_size"]),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        from advpt.data.module import Transformed
        from advpt.data.transforms import Views

        # One view per image, batched as ([images], labels) like pre-training (ImagesPerSecond reads it);
        # shuffle order and augmentations follow (seed, epoch), as in pre-training, so resuming repeats them.
        views = Views([train_transform(self.optim, self.image_size)])
        return self.resumable_loader(
            Transformed(self.train_source, views, seed=self.seed),
            batch_size=int(self.cfg["batch_size"]),
            seed=self.seed,
            num_workers=int(self.cfg.get("num_workers", 0)),
        )

    def val_dataloader(self) -> DataLoader | list:
        from advpt.data.module import Transformed
        from advpt.data.transforms import eval_transform

        if self.val_source is None:
            return []  # no test split: no val/top1
        return self._loader(Transformed(self.val_source, eval_transform(self.image_size)), shuffle=False)


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
    ) -> None:
        from timm.data import Mixup
        from torchmetrics.classification import MulticlassAccuracy

        super().__init__()
        self.save_hyperparameters()
        self.optim_cfg, self.num_classes = dict(optim), int(num_classes)
        self.layer_decay, self.batch_size, self.seed = float(layer_decay), int(batch_size), int(seed)
        self.net = Encoder.from_config(model, self.num_classes, drop_path_rate=float(optim["drop_path_rate"]))
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

    @property
    def vit(self) -> nn.Module:
        return self.net.vit

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

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
        from advpt.methods.classify import soft_cross_entropy

        (images,), labels = batch
        images, targets = self.targets(images, labels)
        loss = soft_cross_entropy(self(images), targets).mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        self.log("train/lr", max(g["lr"] for g in self.optimizers().param_groups), batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_top1(logits, labels)
        self.log("val/loss", F.cross_entropy(logits.float(), labels), batch_size=images.shape[0])
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=images.shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    @property
    def lr(self) -> float:
        """Absolute peak lr: the recipe's lr at ``lr_batch`` images, scaled linearly to the batch."""
        from advpt.methods.base import effective_batch

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


# -- the command ----------------------------------------------------------------------------------
def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``finetune`` config; fill in the pre-trained file and its model config.

    One layer decay remains: the top-level ``layer_decay`` (``optim.layer_decay`` is only its default).
    """
    with open_dict(cfg):
        check_arguments("finetune", cfg)
        optim = cfg.optim
        if optim.opt not in OPTIMIZERS:
            raise UserError(f"optim.opt={optim.opt} is not supported; choose one of {', '.join(OPTIMIZERS)}")
        if optim.transform not in TRANSFORMS:
            raise UserError(
                f"optim.transform={optim.transform} is unknown; choose one of {', '.join(TRANSFORMS)}"
            )
        gamma = parse_number(cfg.layer_decay, "layer_decay")
        if optim.opt != "adamw" and gamma != 1:
            raise UserError(
                f"layer_decay={cfg.layer_decay} does not apply to optim={optim.name}, which trains "
                "every layer at one lr (Steiner et al.): leave layer_decay out, or use optim=adamw_lld"
            )
        cfg.layer_decay = gamma
        optim.pop("layer_decay", None)

        source = resolve_pretrained(cfg.pretrained)
        given = cfg.get("model")
        if source.path is None:
            model = OmegaConf.load(CONF_DIR / "model" / f"{SCRATCH_MODEL}.yaml") if given is None else given
            model = model_config(str(model.name), timm_kwargs(OmegaConf.to_container(model, resolve=True)))
        else:
            model = source.model
            if given is not None and _architecture(
                OmegaConf.to_container(given, resolve=True)
            ) != _architecture(model):
                raise UserError(
                    f"model={given.name} (img_size {given.img_size}) is not the architecture of pretrained="
                    f"{source.path} ({model['name']}, img_size {model['img_size']}): leave model= out, "
                    "it is read from the encoder"
                )
        cfg.pretrained = str(source.path) if source.path is not None else "none"
        cfg.model = model
        check_run(cfg, touch_data)
    return cfg


def export_classifier(module: FineTuner, cfg: DictConfig, directory: Path) -> Path:
    """``model.safetensors`` (timm state dict with head) and ``model.json``, the call that loads it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.vit.state_dict().items()}
    path = directory / "model.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    # drop_path_rate only acts in training: the description is of the architecture.
    kwargs = {k: v for k, v in module.net.kwargs.items() if k != "drop_path_rate"}
    spec = {
        "name": module.net.name,
        "kwargs": kwargs,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "num_classes": module.num_classes,
        "pretrained": str(cfg.pretrained),
        "layer_decay": float(cfg.layer_decay),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
    }
    (directory / "model.json").write_text(json.dumps(spec, indent=2))
    return path


def fit(cfg: DictConfig, run_dir: Path) -> FineTuner | None:
    """Fine-tune as configured, writing checkpoints, metrics, config and the classifier into ``run_dir``.

    Returns ``None`` when ``resume=auto`` finds the run already finished (nothing is written).
    """
    from advpt.launch import processes
    from advpt.pretrain import begin, build_trainer

    cfg = check(cfg, touch_data=False)
    data = FinetuneData(cfg.data, cfg.optim, image_size=int(cfg.model.img_size), seed=int(cfg.seed))
    if data.num_classes < 2:
        raise UserError(f"data={cfg.data.name} has {data.num_classes} classes: fine-tuning needs labels")
    with open_dict(cfg):
        cfg.num_classes = data.num_classes
    if not begin(cfg, run_dir, "finetune"):
        return None

    module = FineTuner(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=data.num_classes,
        layer_decay=float(cfg.layer_decay),
        batch_size=int(cfg.data.batch_size),
        seed=int(cfg.seed),
    )
    if cfg.pretrained != "none":
        load_backbone(module.vit, load_encoder_state(Path(cfg.pretrained)))
    if rank_zero_only.rank == 0:
        print(f"advpt finetune: {loaded(cfg)}", flush=True)
    trainer = build_trainer(cfg, run_dir)
    with processes(trainer, "finetune", run_dir):
        trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)
        # A run that stops mid-epoch (max_steps) is still scored on its final weights.
        if data.val_source is not None and module.validated_at != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        export_classifier(module, cfg, run_dir)
        top1 = number(trainer.callback_metrics, "val/top1")
        write_record(run_dir, "finetune", trainer.global_step, val_top1=top1, pretrained=str(cfg.pretrained))
    return module


def loaded(cfg: DictConfig) -> str:
    """Which encoder a run starts from, in words."""
    model = f"{cfg.model.name}, {cfg.model.img_size} px, patch {cfg.model.patch_size}"
    if cfg.pretrained == "none":
        return f"no encoder loaded: training {model} from scratch (pretrained=none)"
    return f"loaded encoder {shown(Path(cfg.pretrained))} ({model})"


def summarise(run_dir: Path) -> str:
    """The lines a fine-tuning run ends with: steps and val top-1, where it is, what to run next."""
    record = read_record(run_dir)
    steps, top1 = record.get("steps", 0), record.get("val_top1")
    headline = f"{steps} step{'s' if steps != 1 else ''}, val top-1 " + (
        f"{100 * top1:.2f} %" if top1 is not None else "not measured (the dataset has no test split)"
    )
    return summary("finetune", run_dir, headline, f"advpt evaluate checkpoint={shown(run_dir)}")


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if fit(cfg, run_dir) is not None and rank_zero_only.rank == 0:
        print(summarise(run_dir))
