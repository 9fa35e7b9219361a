"""Sharded data parallelism (``trainer.strategy=fsdp``: PyTorch's FSDP2, ``fully_shard``) and
activation checkpointing, for every method, nominal and adversarial.

Each transformer block is its own sharded group (encoder, MAE decoder, BYOL online and target),
and so is every top-level network around them (an encoder's embeddings and norms, the decoder's
embedding and prediction, the heads). Adversarial training runs K forward and input-gradient
backward passes before the update: :func:`gathered` all-gathers every group once for the whole
attack, where FSDP's hooks would gather each group again in every pass (twice: forward and
backward), and the attack computes no weight gradient, so it triggers no reduce-scatter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from advpt.models import Encoder

# Methods of advpt's encoder that read its parameters without going through forward().
_FORWARD_METHODS = ("features", "visible_tokens")


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every process in one data-parallel (sharding) dimension.

    ``last.ckpt`` stays one file holding the full state dict (gathered on rank 0), so resuming,
    ``advpt evaluate`` and the exported encoder read it as they read a DDP run's.
    """

    strategy_name = "fsdp"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def strategy(name: Any) -> Any:
    """What the Trainer gets for ``trainer.strategy``: ``fsdp`` is FSDP2, anything else is Lightning's."""
    return ShardedDataParallel() if name == "fsdp" else name


def shard(module: nn.Module, mesh: Any, precision: str) -> None:
    """``fully_shard`` every block, then every top-level network of ``module``, over ``mesh``.

    Under ``bf16-mixed`` the parameters are gathered and computed in bf16 while gradients are
    reduced in fp32 (the sharded parameters and the optimiser state stay fp32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy()
    if precision.startswith("bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Every group frees its gathered parameters after each forward and backward (the roots too,
    # unlike FSDP's default): a network that runs no backward (BYOL's target) must never keep a
    # gathered copy past the update that changes its shards.
    for block in blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for network in networks(module):
        fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        if isinstance(network, Encoder):
            for name in _FORWARD_METHODS:
                register_fsdp_forward_method(network, name)
    from torch.distributed.tensor import DTensor

    whole = [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]
    if whole:  # a parameter outside every group would be trained without its gradient reduced
        raise RuntimeError(f"trainer.strategy=fsdp left parameters unsharded: {', '.join(whole[:5])}")


def networks(module: nn.Module) -> Iterator[nn.Module]:
    """The top-level modules holding parameters no block holds; a container around an encoder
    (BYOL's target ModuleDict, a weight average) is looked into, so the encoder itself is sharded."""
    for child in module.children():
        if isinstance(child, Block) or not any(True for _ in child.parameters()):
            continue
        if not isinstance(child, Encoder) and any(isinstance(m, Encoder) for m in child.modules()):
            yield from networks(child)
        else:
            yield child


def blocks(module: nn.Module) -> list[Block]:
    return [m for m in module.modules() if isinstance(m, Block)]


def local(t: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every sharded group of ``module`` that holds trainable parameters all-gathered once and kept
    whole for the duration (the attack's K forward and backward passes); no-op when nothing is sharded.

    Call it before :func:`advpt.attacks.frozen`: FSDP gives the gathered parameters the
    ``requires_grad`` of the sharded ones when it first gathers them.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule) and _trains(m)]
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
        group.set_reshard_after_backward(False, recurse=False)
        group.unshard()
    try:
        yield
    finally:
        for group in groups:  # back to shard() 's rule, sharded: the update must see fresh shards
            group.set_reshard_after_forward(True, recurse=False)
            group.set_reshard_after_backward(True, recurse=False)
            group.reshard()


def broadcast_batch_norm_statistics(module: nn.Module) -> None:
    """Every process takes rank 0's batch-norm running statistics, as DDP does before each step.

    FSDP shards parameters only; without this each process would keep the statistics of its own
    batches, and the attack, which runs in eval mode, would see different ones on each process.
    """
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    for norm in module.modules():
        if isinstance(norm, _BatchNorm):
            for buffer in norm.buffers():
                dist.broadcast(buffer, src=0)


def _trains(group: nn.Module) -> bool:
    """Whether the sharded group ``group`` holds a trainable parameter (nested groups hold their own)."""
    from torch.distributed.fsdp import FSDPModule

    nested = {
        id(p) for m in group.modules() if m is not group and isinstance(m, FSDPModule) for p in m.parameters()
    }
    return any(p.requires_grad for p in group.parameters() if id(p) not in nested)


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict, whole and on the CPU; under FSDP a collective: every process calls it."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
        for k, v in module.state_dict().items()
    }


def checkpoint_activations(module: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Inside the block (its ``forward``), so FSDP's hooks around it stay outside the recomputed
    region; non-reentrant, so the attack's ``torch.autograd.grad`` with respect to the input works.
    Parameter names are unchanged. (timm's ``set_grad_checkpointing`` wraps ``vit.blocks`` from the
    outside and only in ``forward_features``, which MAE's visible-token path does not use.)
    """
    for block in blocks(module):
        if not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
