"""How many graphs ``compile=true`` makes, per method and depth: the count must not grow with depth.

    python benchmarks/compile_graphs.py                      # every method, depth 2, 6, 12, 32-wide blocks
    python benchmarks/compile_graphs.py --methods supervised --depths 2 12 --drop-path 0.1

``compile=true`` compiles each transformer block in place (``nn.Module.compile``, as
``configure_model`` does). Blocks share one code object, so one graph can serve them all, unless
something that differs between blocks is baked into the graph as a constant (a per-block drop-path
rate is such a thing) and each block then recompiles; past dynamo's recompile limit (8 per code
object) the rest run eagerly, silently. Here each method runs what a run does in every mode a block
meets: a training step (the attack's PGD passes in eval mode with frozen weights, the clean pass,
the backward), a logging step's no-grad diagnostics, and an eval-mode no-grad forward (the kNN
monitor, the figures). Graphs are counted with dynamo's own counters on the ``eager`` backend, which
traces as inductor would but compiles nothing, so the count is the same on CPU and GPU and takes
seconds.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import load  # noqa: E402  (benchmarks/ is not a package)

from advpt.methods import METHODS, base  # noqa: E402


def graphs(method: str, depth: int, drop_path: float, timm_drop_path: bool = False) -> dict[str, int]:
    """Dynamo's counts for one module of ``depth`` blocks through every mode a run puts it in."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = load("model", "vit_micro")
    model = {**model, "kwargs": {**model["kwargs"], "depth": depth}}
    attack = {"norm": "l2", "eps": 0.5, "steps": 2}
    settings = {**load("method", method), "mixup": 0.0, "cutmix": 0.0, "drop_path_rate": drop_path}
    module = METHODS[method](model=model, method=settings, attack=attack, num_classes=10, compile=True)
    original, buffered = nn.Module.compile, base.buffered_drop_path
    nn.Module.compile = functools.partialmethod(original, backend="eager")  # type: ignore[method-assign]
    if timm_drop_path:  # as before: timm's DropPath, its rate a float baked into each block's graph
        base.buffered_drop_path = lambda _block: None
    try:
        module.configure_model()
    finally:
        nn.Module.compile, base.buffered_drop_path = original, buffered  # type: ignore[method-assign]
    side = int(model["img_size"])
    views = [torch.rand(8, 3, side, side) for _ in range(2 if method == "byol" else 1)]
    batch = (views, torch.randint(0, 10, (8,)))
    module.log = lambda *_a, **_k: None  # type: ignore[method-assign]  # no Trainer here
    module._logging_step = lambda: True  # type: ignore[method-assign]  # the diagnostics' mode too
    module.train()
    for _ in range(2):  # a second step must reuse what the first compiled
        loss = module.training_step(batch, 0)
        loss.backward()
    module.eval()
    with torch.no_grad():
        module.encoder(views[0])
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["ok"]),
        "recompile_limit": sum(1 for k in counters["stats"] if "limit" in str(k)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    parser.add_argument("--drop-path", type=float, default=0.1, help="drop_path_rate (0: none)")
    parser.add_argument(
        "--timm-drop-path",
        action="store_true",
        help="keep timm's DropPath (a float rate per block): the old way",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}; drop_path_rate {args.drop_path}"
        f"{' (timm DropPath)' if args.timm_drop_path else ''}; graphs (frames) per depth"
    )
    print("| method | " + " | ".join(f"depth {d}" for d in args.depths) + " | grows with depth |")
    print("|---|" + "---|" * (len(args.depths) + 1))
    worst = 0
    for method in args.methods:
        counts = [graphs(method, d, args.drop_path, args.timm_drop_path) for d in args.depths]
        grows = counts[-1]["graphs"] > counts[0]["graphs"]
        worst = max(worst, counts[-1]["graphs"] - counts[0]["graphs"])
        cells = " | ".join(f"{c['graphs']} ({c['frames']})" for c in counts)
        print(f"| {method} | {cells} | {'yes' if grows else 'no'} |")
    print(f"most graphs added from depth {args.depths[0]} to {args.depths[-1]}: {worst}")


if __name__ == "__main__":
    main()
