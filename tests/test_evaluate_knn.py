"""``advpt evaluate`` on an encoder: the kNN top-1 (clean and robust) of a pre-training run, ``timm:NAME``
or an MAE release ``.pth``, equal to the pre-training monitor's; the weighted vote against DINO's
formula; the feature-space attack; what ``results.json`` records; bad input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import FAST, compose, finetuned_run, one_line, run_cli
from safetensors.torch import save_file

from advpt.attacks import Attack
from advpt.evaluate import evaluate, format_table
from advpt.evaluate.encoder import load, resolve_encoder
from advpt.evaluate.knn import KnnProbe, bank_and_queries, knn_top1, knn_votes
from advpt.runs import finished_runs, is_finished

# The monitor's bank and queries, made small: what the session's pre-training run measured at its end.
BANK, QUERIES = 200, 100
SMALL = [f"knn.bank_size={BANK}", f"knn.max_queries={QUERIES}", "num_workers=0"]
MICRO_ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
KNN_KEYS = {"top1", "robust_top1", "k", "temperature", "bank", "queries", "norm", "eps", "steps"}


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch adversarial MAE run of vit_micro with the monitor at its end (epoch 0)."""
    run = tmp_path_factory.mktemp("knn") / "pretrain"
    args = ["pretrain", "model=vit_micro", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    args += ["data.batch_size=32", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    args += [f"monitor.bank_size={BANK}", f"monitor.eval_size={QUERIES}"]
    torch.set_num_threads(1)
    assert run_cli(args) == 0
    return run


def encoder_of(run: Path):
    model, notes = load(resolve_encoder(run))
    assert notes == []
    return model


def digits_probe(attack: Attack, bank: int = 150, queries: int = 60, batch_size: int = 256) -> KnnProbe:
    from advpt.data.sources import Digits

    splits = bank_and_queries(Digits(True, 16), Digits(False, 16), 16, bank, queries, 0, batch_size)
    return KnnProbe(*splits, attack, batch_size=batch_size)


# -- (a) the monitor's numbers -----------------------------------------------------------------------
def test_knn_of_a_pretrain_run_equals_its_monitor(pretrain_run: Path, tmp_path: Path) -> None:
    record = json.loads((pretrain_run / "run.json").read_text())
    results = evaluate(compose(f"checkpoint={pretrain_run}", *SMALL), tmp_path, warn=pytest.fail)
    knn = results["knn"]
    assert (knn["bank"], knn["queries"]) == (BANK, QUERIES)
    # The same encoder, bank, queries, attack (l2 0.5, PGD-2) and random starts (seed 0, epoch 0).
    assert knn["top1"] == pytest.approx(record["knn_top1"], abs=1e-7)
    assert knn["robust_top1"] == pytest.approx(record["knn_robust_top1"], abs=1e-7)
    assert results["data"] == {"name": "builtin", "root": None}  # read from the run's config.yaml


# -- (b) DINO's weighted vote ------------------------------------------------------------------------
def dino_knn(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, T: float, C: int):
    """facebookresearch/dino's ``knn_classifier`` (eval_knn.py), transcribed in numpy: features
    L2-normalised, the k most similar by dot product, one-hot labels weighted by exp(sim / T), summed."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarity = test @ train.T
    indices = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    distances = np.take_along_axis(similarity, indices, axis=1)
    retrieval_one_hot = np.eye(C)[train_labels[indices]]  # [Q, k, C]
    probs = (retrieval_one_hot * np.exp(distances / T)[..., None]).sum(axis=1)
    return probs, probs.argmax(axis=1)


@pytest.mark.parametrize("k,T", [(1, 0.07), (5, 0.07), (5, 1.0), (20, 0.5)])
def test_weighted_votes_equal_dinos_formula(k: int, T: float) -> None:
    g = np.random.default_rng(0)
    # Four classes around four directions, scaled at random: only the direction counts.
    centres = g.normal(size=(4, 6))
    bank_labels = np.arange(40) % 4
    bank = (centres[bank_labels] + 0.8 * g.normal(size=(40, 6))) * g.uniform(0.5, 3, size=(40, 1))
    labels = g.integers(0, 4, size=15)
    queries = centres[labels] + 0.8 * g.normal(size=(15, 6))
    probs, predictions = dino_knn(bank, bank_labels, queries, k, T, 4)

    as_tensor = [torch.tensor(a, dtype=torch.float32) for a in (bank, queries)]
    votes = knn_votes(as_tensor[0], torch.tensor(bank_labels), as_tensor[1], 4, k, T)
    np.testing.assert_allclose(votes.numpy(), probs, rtol=1e-4)
    top1 = knn_top1(as_tensor[0], torch.tensor(bank_labels), as_tensor[1], torch.tensor(labels), k, T)
    assert top1 == pytest.approx(float((predictions == labels).mean()))


# -- (c) the feature-space attack --------------------------------------------------------------------
def test_robust_queries_move_away_from_their_clean_features_and_lower_the_knn(pretrain_run: Path) -> None:
    encoder = encoder_of(pretrain_run)
    attacked = digits_probe(Attack("l2", 1.0, steps=3))
    with torch.no_grad():
        clean, _, moved = attacked.encode(encoder, attacked.queries, robust=True)
    distance = 1 - torch.nn.functional.cosine_similarity(moved, clean, dim=-1)
    assert (distance > 0).all() and distance.mean() > 1e-3
    scores = attacked.scores(encoder)
    assert scores.robust_top1 <= scores.top1 and (scores.bank, scores.queries) == (150, 60)

    still = digits_probe(Attack("l2", 0.0, steps=3))
    with torch.no_grad():
        clean0, _, unmoved = still.encode(encoder, still.queries, robust=True)
    assert torch.equal(unmoved, clean0) and torch.equal(clean0, clean)
    unattacked = still.scores(encoder)
    assert unattacked.robust_top1 == unattacked.top1 == scores.top1


def test_eps_0_and_robust_false_through_the_command(pretrain_run: Path, tmp_path: Path) -> None:
    zero = evaluate(compose(f"checkpoint={pretrain_run}", *SMALL, "knn.eps=0"), tmp_path / "a")
    assert zero["knn"]["robust_top1"] == zero["knn"]["top1"] and zero["knn"]["eps"] == 0
    off = evaluate(compose(f"checkpoint={pretrain_run}", *SMALL, "knn.robust=false"), tmp_path / "b")
    assert off["knn"]["robust_top1"] is None and off["knn"]["top1"] == zero["knn"]["top1"]
    linf = evaluate(compose(f"checkpoint={pretrain_run}", *SMALL, "knn.norm=linf", "knn.eps=8/255"), tmp_path)
    assert linf["knn"]["norm"] == "linf" and linf["knn"]["eps"] == pytest.approx(8 / 255)
    assert linf["knn"]["robust_top1"] <= linf["knn"]["top1"]


# -- (d) weights made elsewhere ------------------------------------------------------------------------
def mae_release(directory: Path) -> tuple[Path, Path]:
    """One random ViT written twice: as MAE's release (``{'model': state_dict}``, the final norm ``norm``,
    no head) and as advpt's encoder.safetensors (``fc_norm``) with encoder.json."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **MICRO_ARCH)
    with torch.no_grad():
        vit.norm.weight.normal_(1.0, 0.2), vit.norm.bias.normal_(0.0, 0.2)  # a norm that is not the identity
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    assert "norm.weight" in state and not any(k.startswith(("head.", "fc_norm.")) for k in state)
    directory.mkdir(parents=True)
    torch.save({"model": state}, directory / "mae_pretrain_vit_micro.pth")
    ours = directory / "ours"
    ours.mkdir()
    renamed = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()}
    save_file(renamed, str(ours / "encoder.safetensors"))
    kwargs = {**MICRO_ARCH, "num_classes": 0, "global_pool": "avg"}
    (ours / "encoder.json").write_text(json.dumps({"name": "vit_tiny_patch16_224", "kwargs": kwargs}))
    return directory / "mae_pretrain_vit_micro.pth", ours


def test_an_mae_release_pth_evaluates_as_the_same_weights_in_advpts_layout(tmp_path: Path) -> None:
    pth, ours = mae_release(tmp_path / "weights")
    notes: list[str] = []
    released = evaluate(compose(f"checkpoint={pth}", "model=vit_micro", *SMALL), tmp_path / "a", notes.append)
    assert released["checkpoint"] == str(pth) and released["model"]["name"] == "vit_tiny_patch16_224"
    assert notes == [
        f"checkpoint={pth} records no data: kNN on the built-in digits (choose another with data=NAME)"
    ]
    same = evaluate(compose(f"checkpoint={ours}", *SMALL), tmp_path / "b", lambda _: None)
    assert released["knn"] == same["knn"]
    assert 0 <= released["knn"]["robust_top1"] <= released["knn"]["top1"] <= 1


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> str:
    """A timm ViT's (random) weights in a Hugging Face cache laid out as a download leaves it; offline."""
    import huggingface_hub.constants

    name = "vit_tiny_patch16_224.augreg_in21k"
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return name


def test_a_timm_model_evaluates_offline_from_the_cache(hub: str, tmp_path: Path) -> None:
    # 16-pixel patches of 32-pixel digits: 2x2 tokens, so that 12 blocks of 192 stay fast.
    model = ["model=vit_tiny_patch4_32", "model.patch_size=16"]
    notes: list[str] = []
    small = ["knn.bank_size=60", "knn.max_queries=30", "num_workers=0"]
    results = evaluate(compose(f"checkpoint=timm:{hub}", *model, *small), tmp_path, notes.append)
    assert results["checkpoint"] == f"timm:{hub}" and results["model"]["image_size"] == 32
    assert any(n.startswith(f"resampled the position embedding of checkpoint=timm:{hub}") for n in notes)
    assert 0 <= results["knn"]["top1"] <= 1 and results["knn"]["queries"] == 30


# -- (e) results.json, the table, the summary -------------------------------------------------------
def test_results_json_schema_and_a_finished_evaluation(pretrain_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "outputs" / "evaluate" / "knn"
    results = evaluate(compose(f"checkpoint={pretrain_run}", *SMALL), out, warn=pytest.fail)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) == {"checkpoint", "suite", "top1_unit", "model", "data", "knn", "warnings", "config"}
    assert on_disk["checkpoint"] == str((pretrain_run / "encoder.safetensors").resolve())
    assert (on_disk["suite"], on_disk["top1_unit"]) == ("knn", "fraction")
    knn = on_disk["knn"]
    assert set(knn) == KNN_KEYS
    types = {"top1": float, "robust_top1": float, "k": int, "temperature": float, "bank": int}
    types |= {"queries": int, "norm": str, "eps": float, "steps": int}
    assert all(isinstance(knn[key], kind) for key, kind in types.items()), knn
    assert 0 <= knn["top1"] <= 1 and 0 <= knn["robust_top1"] <= 1
    assert (knn["k"], knn["temperature"], knn["norm"], knn["eps"], knn["steps"]) == (20, 0.07, "l2", 0.5, 2)
    # results.json is the evaluate command's product: the run counts as finished.
    assert is_finished(out, "evaluate") and [r.directory for r in finished_runs("evaluate", tmp_path)] == [
        out
    ]

    table = format_table(results)
    assert "200 training images as the bank, 100 queries" in table
    rows = [line.split() for line in table.splitlines()]
    assert ["clean", f"{100 * knn['top1']:.2f}"] in rows
    assert ["robust", "(l2", "0.5,", "PGD-2)", f"{100 * knn['robust_top1']:.2f}"] in rows


def test_a_classifier_keeps_its_schema_and_adds_knn_when_asked(tmp_path: Path) -> None:
    run = finetuned_run(tmp_path / "ft")
    plain = evaluate(compose(f"checkpoint={run}", *FAST, "corruptions=false"), tmp_path / "a", pytest.fail)
    assert "knn" not in plain and plain["suite"] == "auto"
    asked = compose(f"checkpoint={run}", *FAST, "corruptions=false", "knn.enabled=true", *SMALL[:2])
    with_knn = evaluate(asked, tmp_path / "b", warn=pytest.fail)
    assert {k: v for k, v in with_knn.items() if k not in ("knn", "config")} == {
        k: v for k, v in plain.items() if k != "config"
    }
    assert set(with_knn["knn"]) == KNN_KEYS and with_knn["knn"]["bank"] == BANK
    # The backbone's pooled features are those of the same weights without their head.
    model = encoder_of_classifier(run)
    probe_scores = digits_probe(Attack("l2", 0.5, steps=2), BANK, QUERIES).scores(model)
    assert with_knn["knn"]["top1"] == probe_scores.top1 and "weighted kNN" in format_table(with_knn)


def encoder_of_classifier(run: Path):
    from advpt.evaluate import load_classifier, read_spec

    weights = run / "model.safetensors"
    return load_classifier(weights, read_spec(weights))


def test_the_cli_prints_the_knn_and_names_it_in_the_summary(
    pretrain_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["evaluate", f"checkpoint={pretrain_run}", *SMALL, "hydra.run.dir=ev"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    knn = results["knn"]
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-3:] == [
        f"advpt evaluate: kNN top-1 {100 * knn['top1']:.2f} % (robust {100 * knn['robust_top1']:.2f} %, "
        "l2 0.5), results in ev/results.json",
        "  run:  ev",
        f"  next: advpt finetune pretrained={pretrain_run}",
    ]
    assert "weighted kNN of the features (k=20, T=0.07)" in out
    assert math.isfinite(knn["top1"])


def test_the_cli_suggests_fine_tuning_a_release_in_its_model(tmp_path: Path, monkeypatch, capsys) -> None:
    mae_release(tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    pth = "weights/mae_pretrain_vit_micro.pth"
    assert run_cli(["evaluate", f"checkpoint={pth}", "model=vit_micro", *SMALL, "hydra.run.dir=ev"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"  next: advpt finetune pretrained={pth} model=vit_micro"
    assert "records no data: kNN on the built-in digits" in captured.err


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["checkpoint={pth}"], "holds weights without their architecture: name it with model="),
        (["checkpoint={pth}", "model=vit_tiny_patch4_32"], "does not fit the model vit_tiny_patch16_224"),
        (["checkpoint={pre}", "model=vit_mini_patch8_32"], "is not the architecture of checkpoint="),
        (["checkpoint={pre}", "knn.enabled=false"], "knn.enabled=false leaves nothing to evaluate"),
        (["checkpoint={pre}", "suite=imagenet_variants"], "suite=imagenet_variants scores a classifier"),
        (["checkpoint={pre}", "knn.k=0"], "knn.k=0 is invalid"),
        (["checkpoint={pre}", "knn.norm=l3"], "knn.norm=l3 is invalid"),
        (["checkpoint={pre}", "knn.eps=-1"], "knn.eps=-1 is out of range"),
        (["checkpoint={pre}", "knn.norm=linf", "knn.eps=8"], "knn.eps=8 is out of range"),
        (["checkpoint={pre}", "knn.eps=2/255", "knn.temperature=0"], "knn.temperature=0 is out of range"),
        (["checkpoint={pre}", "knn.bank_size=0"], "knn.bank_size=0 is invalid"),
        (["checkpoint={pre}", "data=imagefolder"], "data=imagefolder needs data.root=PATH"),
        (["checkpoint={ft}", "model=vit_micro"], "model= is for an encoder's kNN evaluation"),
        (["checkpoint={ft}", "data=builtin"], "data= is for an encoder's kNN evaluation"),
        (["checkpoint=timm:not_a_model"], "timm has no model 'not_a_model'"),
        (["checkpoint={missing}/encoder.safetensors"], "does not exist (give a pre-training run directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needle, tmp_path, monkeypatch, capsys) -> None:
    pth, _ = mae_release(tmp_path / "weights")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "encoder.safetensors").write_bytes((pth.parent / "ours" / "encoder.safetensors").read_bytes())
    (pre / "encoder.json").write_text((pth.parent / "ours" / "encoder.json").read_text())
    ft = finetuned_run(tmp_path / "ft")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(pth=pth, pre=pre, ft=ft, missing=tmp_path / "missing") for a in args]
    assert run_cli(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "evaluate", needle)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_program_named_in_the_runs_config_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    # webdataset would run pipe:CMD in a shell; a location read from a file is data, never a program.
    _, ours = mae_release(tmp_path / "weights")
    marker = tmp_path / "marker"
    (ours / "config.yaml").write_text(f"data:\n  name: shards\n  root: 'pipe:touch {marker} #'\n")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["evaluate", f"checkpoint={ours}", "hydra.run.dir=ev"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "a location that runs a program when opened")
    assert not marker.exists() and not (tmp_path / "ev").exists()


def test_timm_weights_neither_cached_nor_downloadable_are_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["evaluate", "checkpoint=timm:vit_tiny_patch16_224.augreg_in21k", "hydra.run.dir=ev"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "timm could not load its weights")
    assert not (tmp_path / "ev").exists()
