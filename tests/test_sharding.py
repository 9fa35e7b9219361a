"""FSDP's layout, in one process: the groups advpt shards and what each process then holds
(torch's ``fake`` process-group backend: N ranks that communicate nothing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def memory():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory

        yield memory
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("method", ["mae", "byol"])
@pytest.mark.parametrize("world", [2, 8])
def test_each_fsdp_process_holds_its_share_of_weights_gradients_and_adam_state(memory, method, world) -> None:
    """benchmarks/memory.py: rank 0's shards of every parameter are 1/N of the whole, up to the
    rounding up of each first dimension (FSDP splits dim 0 into N chunks)."""
    model = yaml.safe_load((ROOT / "conf" / "model" / "vit_micro.yaml").read_text())
    module = memory.build(method, model)
    trained, frozen = memory.held(module)
    assert trained == 16 * sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert frozen == 4 * sum(p.numel() for p in module.parameters() if not p.requires_grad)
    expected_trained = expected_frozen = 0
    for p in module.parameters():
        rows = -(-p.shape[0] // world) if p.dim() else 1
        share = min(rows, p.shape[0] if p.dim() else 1) * (p[0].numel() if p.dim() else 1)
        if p.requires_grad:
            expected_trained += 16 * share
        else:
            expected_frozen += 4 * share
    assert memory.sharded_bytes(method, model, world) == (expected_trained, expected_frozen)
    if method == "byol":
        assert frozen > 0  # the target network: parameters only


def test_every_parameter_of_every_method_is_sharded() -> None:
    """Blocks, then every network around them (a container around an encoder looked into): no
    parameter is left outside a group, where its gradient would never be reduced."""
    import torch.distributed as dist
    from helpers import make_method
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from advpt.models import Encoder
    from advpt.training.sharding import shard

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        for name in ("mae", "byol", "supervised", "rotnet"):
            module = make_method(name)
            shard(module, init_device_mesh("cpu", (2,)), "32-true")
            assert all(isinstance(p, DTensor) for p in module.parameters()), name
            encoders = [m for m in module.modules() if isinstance(m, Encoder)]
            assert encoders and all(isinstance(e, FSDPModule) for e in encoders), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["mae", "byol"])
def test_the_memory_benchmarks_adversarial_step_trains(memory, method) -> None:
    """``benchmarks/memory.py --peak`` measures this step on a GPU; here it runs on the CPU and updates."""
    model = yaml.safe_load((ROOT / "conf" / "model" / "vit_micro.yaml").read_text())
    module = memory.adversarial_step(method, model, batch=4, checkpointing=True, device="cpu")
    trained = [p for p in module.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.isfinite().all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
