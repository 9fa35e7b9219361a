"""The pre-training monitor (``monitor=knn``): the weighted kNN against its closed form, uneven shares
gathered, features in eval mode without gradients, PGD that moves features, a run's weights unchanged by
it, its numbers in metrics.csv, the config, and the report's curve. Two real processes giving the numbers
of one: tests/test_distributed.py (the ddp_probe launch)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load, one_line, run_cli
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from advpt.attacks import Attack
from advpt.models import Encoder
from advpt.training.monitor import KnnMonitor, gathered, knn_top1, knn_votes, share

TINY = ["model=vit_micro", "trainer.enable_progress_bar=false", "data.batch_size=32"]
QUICK_MONITOR = ["monitor.every_n_epochs=1", "monitor.bank_size=200", "monitor.eval_size=100"]


def digits(train: bool, limit: int, size: int = 16) -> TensorDataset:
    """The built-in digits as float images (what the eval transform gives), at most ``limit``."""
    from advpt.data.sources import Digits

    d = Digits(train=train, size=size)
    return TensorDataset(d.images[:limit].float() / 255, torch.tensor(d.targets[:limit]))


def micro_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder.from_config(load("model", "vit_micro"))


# -- the classifier --------------------------------------------------------------------------------
def test_weighted_knn_equals_its_closed_form() -> None:
    # Lengths differ on purpose: only the direction (cosine) counts.
    bank = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[4.0, 0.0]])
    # Its 3 nearest: [2,0] (cos 1, class 0), [5,5] (cos 1/sqrt2, class 1), [0,3] (cos 0, class 1).
    for temperature in (0.1, 1.0):
        votes = knn_votes(bank, labels, query, num_classes=3, k=3, temperature=temperature)
        expected = [math.exp(1 / temperature), math.exp(2**-0.5 / temperature) + 1.0, 0.0]
        torch.testing.assert_close(votes[0], torch.tensor(expected), rtol=1e-6, atol=0)
    # T=0.1: the one close neighbour of class 0 outweighs two of class 1; T=1: the majority wins.
    assert knn_top1(bank, labels, query, torch.tensor([0]), k=3, temperature=0.1) == 1.0
    assert knn_top1(bank, labels, query, torch.tensor([1]), k=3, temperature=1.0) == 1.0
    # k counts: with k=1 only the nearest votes; k beyond the bank takes the whole bank.
    nearest = knn_votes(bank, labels, query, 3, k=1, temperature=1.0)[0]
    torch.testing.assert_close(nearest, torch.tensor([math.exp(1), 0.0, 0.0]))
    everything = knn_votes(bank, labels, query, 3, k=99, temperature=1.0)[0]
    assert everything[2] == pytest.approx(math.exp(-1))


# -- shares and their gather -----------------------------------------------------------------------
def test_uneven_shares_gather_back_into_the_order_of_one_process() -> None:
    size, batch = 23, 4  # 6 batches, the last of 3: rank 0 takes 3 batches (12 images), rank 1 11
    shares = [share(size, batch, rank, 2) for rank in (0, 1)]
    assert [len(s) for s in shares] == [3, 3] and sum(len(b) for s in shares for b in s) == size
    assert shares[0][0] == [0, 1, 2, 3] and shares[1][0] == [4, 5, 6, 7] and shares[1][-1] == [20, 21, 22]
    assert share(size, batch) == [list(range(s, min(s + 4, size))) for s in range(0, size, 4)]

    features = torch.randn(size, 5)
    sent: list[list[torch.Tensor]] = []
    for rank_share in shares:  # each rank's padded tensors, as it sends them
        index = torch.tensor([i for b in rank_share for i in b])
        sent.append([])
        gathered([features[index], index * 10], index, 12, lambda t, s=sent[-1]: s.append(t) or t[None])
    calls = iter(range(3))

    def gather(t: torch.Tensor) -> torch.Tensor:  # both ranks' k-th tensors, stacked as all_gather does
        k = next(calls)
        return torch.stack([sent[0][k], sent[1][k]])

    index = torch.tensor([i for b in shares[0] for i in b])
    whole, labels = gathered([features[index], index * 10], index, 12, gather)
    assert torch.equal(whole, features) and torch.equal(labels, torch.arange(size) * 10)
    assert all(t.shape[0] == 12 for rank in sent for t in rank)  # same shape on every rank


# -- what the monitor touches ----------------------------------------------------------------------
def test_features_are_taken_in_eval_mode_without_gradients_and_nothing_is_left_changed() -> None:
    encoder = micro_encoder().train()
    monitor = KnnMonitor(digits(True, 40), digits(False, 20), Attack("l2", 0.5, steps=2), batch_size=16)
    seen: list[tuple[bool, bool, bool]] = []
    encoder.vit.blocks[0].register_forward_pre_hook(
        lambda m, _: seen.append(
            (m.training, torch.is_grad_enabled(), any(p.requires_grad for p in encoder.parameters()))
        )
    )
    before = torch.get_rng_state()
    weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    scores = monitor.measure(encoder)
    assert 0 <= scores["monitor/knn_robust_top1"] <= 1 and 0 <= scores["monitor/knn_top1"] <= 1
    clean = [s for s in seen if not s[1]]
    attack = [s for s in seen if s[1]]
    assert len(clean) == 3 + 2 + 2  # bank batches, query batches, then each query batch's attacked input
    assert len(attack) == 2 * 2  # 2 PGD steps per query batch, each needing the input's gradient
    assert not any(training or requires_grad for training, _, requires_grad in seen)
    # Afterwards: train mode, trainable, no gradient accumulated, weights and random stream as they were.
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())
    assert torch.equal(torch.get_rng_state(), before)


def test_pgd_moves_features_away_and_the_robust_knn_is_at_most_the_clean() -> None:
    encoder = micro_encoder().eval()
    images, labels = digits(False, 64)[:]
    monitor = KnnMonitor(None, None, Attack("l2", 1.0, steps=3))
    with torch.no_grad():
        clean = encoder.features(images)
        attacked = monitor.attacked(encoder, images, clean, first=0, epoch=0)
        noise = torch.randn_like(images)
        noise = noise * 1.0 / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # random, same l2 radius
        randomly = encoder.features((images + noise).clamp(0, 1))

    def distance(f: torch.Tensor) -> torch.Tensor:
        return 1 - torch.nn.functional.cosine_similarity(f, clean, dim=-1)

    assert (distance(attacked) > distance(randomly)).float().mean() > 0.9
    assert distance(attacked).mean() > 3 * distance(randomly).mean()
    # Through the whole measure: a large radius lowers the kNN top-1.
    strong = KnnMonitor(digits(True, 300), digits(False, 100), Attack("l2", 2.0, steps=3), batch_size=100)
    scores = strong.measure(encoder)
    assert scores["monitor/knn_robust_top1"] < scores["monitor/knn_top1"]


# -- a run, its config and its report ---------------------------------------------------------------
@pytest.mark.slow
def test_a_run_with_the_monitor_ends_with_the_weights_of_one_without(tmp_path: Path, capsys) -> None:
    common = ["pretrain", "trainer.max_epochs=2", "trainer.limit_train_batches=3", *TINY]
    assert run_cli([*common, "monitor=none", f"hydra.run.dir={tmp_path / 'off'}"]) == 0
    assert run_cli([*common, *QUICK_MONITOR, f"hydra.run.dir={tmp_path / 'on'}"]) == 0
    summary = capsys.readouterr().out
    for name in ("encoder.safetensors",):
        a, b = load_file(str(tmp_path / "off" / name)), load_file(str(tmp_path / "on" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpts = [torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("off", "on")]
    for k, v in ckpts[0]["state_dict"].items():  # the decoder too, and the optimiser's state
        assert torch.equal(v, ckpts[1]["state_dict"][k]), k
    moments = [c["optimizer_states"][0]["state"] for c in ckpts]
    assert all(torch.equal(moments[0][i]["exp_avg"], moments[1][i]["exp_avg"]) for i in moments[0])

    rows = list(csv.DictReader((tmp_path / "on" / "metrics.csv").open()))
    points = [
        (r["epoch"], float(r["monitor/knn_top1"]), float(r["monitor/knn_robust_top1"]))
        for r in rows
        if r["monitor/knn_top1"]
    ]
    assert [p[0] for p in points] == ["0", "1"], points
    assert all(0 <= clean <= 1 and 0 <= robust <= 1 for _, clean, robust in points), points
    assert "monitor/knn_top1" not in (tmp_path / "off" / "metrics.csv").read_text()
    record = json.loads((tmp_path / "on" / "run.json").read_text())
    assert record["knn_top1"] == pytest.approx(points[-1][1])
    assert f"kNN top-1 {100 * points[-1][1]:.2f} % (robust {100 * points[-1][2]:.2f} %)" in summary
    assert json.loads((tmp_path / "off" / "run.json").read_text())["knn_top1"] is None


@pytest.mark.slow
def test_a_run_on_shards_takes_its_bank_from_the_training_stream(tmp_path: Path) -> None:
    from advpt.data.shards.write import write_shards

    write_shards({"name": "builtin"}, tmp_path / "shards", shard_size=500, log=lambda _: None)
    data = ["data=shards", f"data.root={tmp_path / 'shards'}", "data.num_workers=0"]
    data += ["monitor.bank_size=100", "monitor.eval_size=50"]
    run = tmp_path / "run"
    assert run_cli(["pretrain", "trainer.max_steps=2", *TINY, *data, f"hydra.run.dir={run}"]) == 0
    (row,) = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["monitor/knn_top1"]]
    assert all(0 <= float(row[f"monitor/knn{kind}_top1"]) <= 1 for kind in ("", "_robust"))


def test_monitor_none_and_fine_tuning_have_no_monitor_and_the_attack_follows_the_run() -> None:
    from advpt.config import check_arguments, compose
    from advpt.training.monitor import ConfiguredMonitor, monitor_callbacks

    def monitor(command: str, *overrides: str) -> list:
        cfg = compose(command, list(overrides))
        check_arguments(command, cfg)
        return monitor_callbacks(cfg)

    (default,) = monitor("pretrain")
    assert isinstance(default, ConfiguredMonitor) and default.k == 20 and default.temperature == 0.07
    assert (default.attack.norm, default.attack.eps) == ("l2", 0.5)
    assert monitor("pretrain", "monitor=none") == [] and monitor("finetune", "pretrained=none") == []
    (linf,) = monitor("pretrain", "attack=linf", "eps=2/255")
    assert (linf.attack.norm, linf.attack.eps) == ("linf", pytest.approx(2 / 255))
    (nominal,) = monitor("pretrain", "attack=none", "monitor.attack.name=linf", "monitor.attack.eps=1/255")
    assert (nominal.attack.norm, nominal.attack.eps) == ("linf", pytest.approx(1 / 255))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["monitor=foo"], "unknown monitor option 'foo'"),
        (["monitor.bank_size=0"], "monitor.bank_size=0 is invalid: expected an integer >= 1"),
        (["monitor.temperature=0"], "monitor.temperature=0 is out of range"),
        (["monitor.attack.name=l3"], "monitor.attack.name=l3 is invalid"),
    ],
)
def test_a_bad_monitor_setting_is_one_line(args, needle, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, None, needle)
    assert list(tmp_path.iterdir()) == []


def test_the_report_draws_knn_against_the_epoch_per_arm(tmp_path: Path) -> None:
    from advpt.report import build_report

    def pretrain_run(name: str, attack: str, seed: int, points: list[tuple[int, float, float]]) -> None:
        run = tmp_path / "runs" / "pretrain" / name
        run.mkdir(parents=True)
        config = {
            "method": {"name": "mae"},
            "attack": {"name": attack, "default_eps": 0.5},
            "eps": 0.5,
            "seed": seed,
        }
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        lines = ["epoch,monitor/knn_robust_top1,monitor/knn_top1,step,train/loss"]
        lines += [f"{e},,,{10 * e},1.0" for e, _, _ in points]  # training rows between the monitor's
        lines += [f"{e},{r},{c},{10 * e + 9}," for e, c, r in points]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")

    pretrain_run("mae-l2-s0", "l2", 0, [(4, 0.5, 0.3), (9, 0.7, 0.5)])
    pretrain_run("mae-l2-s1", "l2", 1, [(4, 0.6, 0.4), (9, 0.8, 0.6)])
    pretrain_run("mae-none", "none", 0, [(4, 0.4, 0.1)])
    (tmp_path / "runs" / "pretrain" / "old").mkdir()  # a run from before the monitor: no points, no error
    (tmp_path / "runs" / "pretrain" / "old" / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")

    notes: list[str] = []
    written = {p.name for p in build_report([tmp_path / "runs"], tmp_path / "r", note=notes.append)}
    assert {"knn_pretrain.png", "knn_pretrain.csv", "summary.md"} <= written
    assert (tmp_path / "r" / "knn_pretrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = list(csv.DictReader((tmp_path / "r" / "knn_pretrain.csv").open()))
    got = {
        (r["attack"], r["epoch"]): (float(r["knn_top1"]), float(r["knn_robust_top1"]), r["runs"])
        for r in curve
    }
    assert got == {
        ("none", "5"): (pytest.approx(0.4), pytest.approx(0.1), "1"),
        ("l2", "5"): (pytest.approx(0.55), pytest.approx(0.35), "2"),  # the two seeds averaged
        ("l2", "10"): (pytest.approx(0.75), pytest.approx(0.55), "2"),
    }
    assert "| MAE l2 0.5 | 10 | 75.00 | 55.00 | 2 |" in (tmp_path / "r" / "summary.md").read_text()
    assert not any(n.startswith("knn:") for n in notes)

    # No pre-training run with the monitor: no figure, one note.
    notes.clear()
    written = {
        p.name
        for p in build_report([tmp_path / "runs" / "pretrain" / "old"], tmp_path / "r2", note=notes.append)
    }
    assert written == {"summary.md"} and any(n.startswith("knn: no pre-training run") for n in notes)
