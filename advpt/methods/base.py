"""What every pre-training method shares: the attack call, optimiser, schedule, logging, export."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from timm.optim import create_optimizer_v2
from torch import Tensor

from advpt.attacks import Attack, Inputs, LossFn, frozen, pgd
from advpt.data.module import seed_batch
from advpt.files import atomic_path, write_json
from advpt.models import Encoder, buffered_drop_path
from advpt.training.schedule import effective_batch, warmup_cosine
from advpt.training.sharding import (
    broadcast_batch_norm_statistics,
    checkpoint_activations,
    full_state,
    gathered,
    shard,
)

if TYPE_CHECKING:
    from torch import nn

    from advpt.published import Weights


class PretrainMethod(L.LightningModule):
    """Base LightningModule: holds the encoder and the attack; subclasses write ``training_step``.

    A subclass builds its per-example loss as a closure over the batch (mask, views, labels), then
    calls :meth:`attacked` to get the input it trains on, so attack and update share everything
    drawn at random in that step.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        method: Mapping[str, Any],
        attack: Mapping[str, Any] | None = None,
        num_classes: int = 0,
        batch_size: int = 64,
        seed: int = 0,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.method_cfg = dict(method)
        # Stochastic depth is a training regulariser: the exported encoder.json leaves it out.
        self.encoder = Encoder.from_config(model, drop_path_rate=float(method.get("drop_path_rate", 0.0)))
        self.attack = Attack(**attack) if attack else None
        self.batch_size = batch_size
        self.seed = seed
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.sharded = False

    def configure_model(self) -> None:
        """Shard (``trainer.strategy=fsdp``), checkpoint activations and compile the transformer blocks.

        Each is done in place, so parameter names, checkpoints and the exported encoder are
        unchanged. ``compile=true`` compiles every block (encoder, MAE decoder, BYOL target) with
        ``nn.Module.compile``; the attack's loop and the methods' glue stay eager.
        """
        if self.sharded:  # Lightning may call this hook again
            return
        if self.activation_checkpointing:
            checkpoint_activations(self)
        if self._device_mesh is not None:  # trainer.strategy=fsdp
            shard(self, self._device_mesh["data_parallel"], str(self.trainer.precision))
            self.sharded = True
        if self.compile_blocks:
            for module in self.modules():
                if isinstance(module, Block):
                    buffered_drop_path(module)  # one graph for blocks of every drop-path rate
                    module.compile()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_batch(self.seed, self.current_epoch, batch_idx, self.global_rank)
        if self.sharded:
            broadcast_batch_norm_statistics(self)

    # -- the attack -------------------------------------------------------------------------
    def attacked(
        self,
        loss_fn: LossFn,
        x: Inputs,
        support: Tensor | tuple[Tensor | None, ...] | None = None,
        coupled: bool = False,
    ) -> Inputs:
        """Return the input to train on: ``x`` itself (nominal) or ``x + PGD(loss_fn)``.

        ``x`` may be a tuple of inputs of different shapes (a method's views or crops), each in its own
        ball; ``coupled``: the loss couples the batch (contrastive negatives), see :func:`advpt.attacks.pgd`.
        """
        if self.attack is None:
            return x
        with gathered(self) if self.sharded else contextlib.nullcontext():
            return self._attacked(loss_fn, x, support, coupled)

    def _attacked(
        self,
        loss_fn: LossFn,
        x: Inputs,
        support: Tensor | tuple[Tensor | None, ...] | None,
        coupled: bool,
    ) -> Inputs:
        assert self.attack is not None
        delta = pgd(loss_fn, x, self.attack, model=self, support=support, coupled=coupled)
        inputs, deltas = (x, delta) if isinstance(x, tuple) else ((x,), (delta,))
        n = inputs[0].shape[0]
        # the adversarial-example figure and the logged norm: the first input (a tuple's first view)
        self._example = (inputs[0][:8].detach(), deltas[0][:8].detach())
        self.log("train/delta_norm", self.attack.threat.norm(deltas[0].float()).mean(), batch_size=n)
        attacked = tuple(i + d for i, d in zip(inputs, deltas, strict=True))
        adversarial = attacked if isinstance(x, tuple) else attacked[0]
        if self._logging_step():
            # Diagnostic, on logging steps only: the attack's loss at the clean and at the attacked
            # input, both in the attack's (eval) mode so they compare even with batch norm (BYOL).
            with torch.no_grad(), frozen(self):
                self.log("train/loss_clean", self.reduce(loss_fn(x)), batch_size=n)
                self.log("train/loss_attacked", self.reduce(loss_fn(adversarial)), batch_size=n)
        return adversarial

    def example_images(self) -> dict[str, Tensor]:
        """Figures for image loggers, each [N, 3, H, W'] in [0, 1]: here clean | attacked | perturbation.

        The perturbation is shown rescaled to its own range (it is far too small to see otherwise).
        """
        example = getattr(self, "_example", None)
        if example is None:
            return {}
        x, delta = example
        scale = delta.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        shown = 0.5 + 0.5 * delta / scale
        return {"adversarial_examples": torch.cat([x, (x + delta).clamp(0, 1), shown], dim=-1).float()}

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's metrics (its rule: the (n+1)-th optimiser step, n = log interval)."""
        trainer = self._trainer
        if trainer is None:
            return False
        return (self.global_step + 1) % max(1, trainer.log_every_n_steps) == 0

    def reduce(self, per_example: Tensor) -> Tensor:
        """Batch loss from per-example losses (a mean unless the method says otherwise)."""
        return per_example.float().mean()

    def log_loss(self, loss: Tensor, batch_size: int) -> None:
        """The optimised loss: at the attacked input when attacking, at the clean input otherwise."""
        self.last_loss = loss.detach()  # read before the optimiser step (StopOnNonFinite)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)

    # -- optimisation -----------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """Absolute lr from the base lr per 256 images (He et al. 2022's scaling rule)."""
        return float(self.method_cfg["base_lr"]) * effective_batch(self, self.batch_size) / 256.0

    def configure_optimizers(self) -> Any:
        m = self.method_cfg
        # timm excludes biases, norms, pos-embed and class token from weight decay.
        optimizer = create_optimizer_v2(
            self, opt="adamw", lr=self.lr, weight_decay=float(m["weight_decay"]), betas=tuple(m["betas"])
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, total, float(m["warmup_fraction"]), float(m.get("min_lr", 0.0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are driven by the update count rather than torch's step().
        scheduler.step_update(num_updates=self.global_step)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.vit.{n}" for n in self.encoder.vit.no_weight_decay()}

    # -- init= ------------------------------------------------------------------------------
    @classmethod
    def check_init_parts(
        cls, weights: Weights, vit: nn.Module, method: Mapping[str, Any], source: str
    ) -> None:
        """One line (a ``UserError``) if what ``init=`` holds for this method's own networks, beyond the
        encoder (checked already against ``vit``, ``model=``'s ViT on the meta device), does not fit
        them as ``method`` (its config) sizes them; shapes only. A method that takes the encoder alone
        has nothing to check."""

    def load_init_parts(self, weights: Weights, source: str) -> str:
        """Load what ``init=`` holds for this method's own networks (its encoders are loaded already);
        returns the line that says what was loaded."""
        from advpt.published import shown_source

        return f"loaded the encoder of init={shown_source(source)}"

    # -- export -----------------------------------------------------------------------------
    def exported_encoder(self) -> Encoder:
        """The encoder that pre-training hands on (a method with a weight average returns the average)."""
        return self.encoder

    def encoder_state(self) -> dict[str, Tensor]:
        """The exported encoder's timm state dict, whole; under FSDP every process must call it."""
        return full_state(self.exported_encoder().vit)

    def export_encoder(self, directory: str | Path, state: dict[str, Tensor] | None = None) -> Path:
        """Write the encoder alone as a timm state dict plus the ``create_model`` call that loads it.

        ``state``: :meth:`encoder_state`, gathered beforehand by every process of a sharded run.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        encoder = self.exported_encoder()
        state = full_state(encoder.vit) if state is None else state
        path = directory / "encoder.safetensors"
        kwargs = {k: v for k, v in encoder.kwargs.items() if k != "drop_path_rate"}
        # encoder.json first: the weights, written last, are what marks the run finished (advpt.runs)
        write_json(
            directory / "encoder.json",
            {"name": encoder.name, "kwargs": kwargs, "method": self.method_cfg["name"]},
        )
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        return path
