"""`advpt report` on synthetic run folders: a known grid gives known curves, intervals and tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import chain_with_outcomes, make_chain

from advpt.report import aggregate as agg
from advpt.report import build_report, intervals, paper_values, table1_markdown
from advpt.report.collect import collect, radius_label, radius_value


def test_wilson_interval_matches_the_closed_form() -> None:
    from scipy.stats import binomtest

    for k, n in ((32, 64), (7, 64), (355, 360)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert intervals.wilson(k / n, n) == pytest.approx(
            (ref.low, ref.high), abs=2e-4
        )  # z = 1.96 vs 1.95996
    lo, hi = intervals.wilson(1.0, 360)
    assert hi == 1.0 and lo == pytest.approx(360 / (360 + 1.96**2), abs=1e-9)


def test_seeds_average_and_their_spread_widens_the_interval() -> None:
    one = intervals.accuracy([(0.8, 1000)])
    two = intervals.accuracy([(0.8, 1000), (0.9, 1000)])
    assert two.mean == pytest.approx(0.85) and two.seeds == 2
    sampling = (0.8 * 0.2 / 1000 + 0.9 * 0.1 / 1000) / 4
    spread = 0.005 / 2  # sample variance of (0.8, 0.9), over 2 seeds
    assert two.half == pytest.approx(1.96 * math.sqrt(sampling + spread))
    assert two.half > one.half


def test_known_grid_gives_known_fig1_curves_and_best_radii(tmp_path: Path) -> None:
    n = 400
    make_chain(
        tmp_path, "scratch", "scratch", "none", 0, {"builtin": (0.80, n), "corruptions": (0.60, n)}, 1.0
    )
    grid = {  # (attack, eps) -> average over the two sets, per layer decay
        ("none", 0): {0.65: 0.70, 0.85: 0.72},
        ("linf", "2/255"): {0.65: 0.78, 0.85: 0.75},
        ("linf", "8/255"): {0.65: 0.74, 0.85: 0.73},
        ("l2", 0.5): {0.65: 0.76, 0.85: 0.77},
        ("l2", 2.0): {0.65: 0.71, 0.85: 0.70},
    }
    for (attack, eps), by_decay in grid.items():
        for decay, avg in by_decay.items():
            name = f"mae-{attack}-{eps}".replace("/", "_")
            make_chain(
                tmp_path,
                name,
                "mae",
                attack,
                eps,
                {"builtin": (avg + 0.1, n), "corruptions": (avg - 0.1, n)},
                decay,
            )
    rows = collect([tmp_path])
    assert len(rows) == 11 and all("corruptions/fog" not in r["sets"] for r in rows)
    main, data = agg.headline_rows(rows)
    assert data == "builtin"
    table, base = agg.fig1(main)
    assert base.mean == pytest.approx(0.70)
    got = {(r["attack"], r["radius"]): (r["layer_decay"], r["minus_scratch"].mean) for r in table}
    assert got == {
        ("none", "-"): (0.85, pytest.approx(0.02)),
        ("linf", "2/255"): (0.65, pytest.approx(0.08)),
        ("linf", "8/255"): (0.65, pytest.approx(0.04)),
        ("l2", "0.5"): (0.85, pytest.approx(0.07)),
        ("l2", "2"): (0.65, pytest.approx(0.01)),
    }
    # the interval of a difference adds both arms' variances: two sets of 400 images each
    var = lambda p, q: (p * (1 - p) / n + q * (1 - q) / n) / 4  # noqa: E731
    gain = next(r["minus_scratch"] for r in table if r["radius"] == "2/255")
    assert gain.half == pytest.approx(1.96 * math.sqrt(var(0.88, 0.68) + var(0.80, 0.60)))
    best = agg.best_by_arm(rows)
    assert {k: radius_value(v) for k, v in best.items()} == {
        ("mae", "none"): 0.0,
        ("mae", "linf"): pytest.approx(2 / 255),
        ("mae", "l2"): 0.5,
    }
    # Fig. 2 columns: the best radius per attack (the scratch model is Fig. 1's baseline)
    columns = agg.fig2(main)
    assert [(c["method"], c["attack"], c["radius"]) for c in columns] == [
        ("mae", "none", "-"),
        ("mae", "linf", "2/255"),
        ("mae", "l2", "0.5"),
    ]
    assert columns[1]["sets"]["builtin"].mean == pytest.approx(0.88)


def test_report_writes_every_figure_table_and_csv(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    n = 200
    make_chain(runs, "scratch", "scratch", "none", 0, {"builtin": (0.9, n), "corruptions": (0.7, n)}, 1.0)
    robust = lambda a: {"l2": {"0.25": (a, 64), "0.5": (a / 2, 64)}}  # noqa: E731
    for method in ("mae", "byol"):
        for attack, eps in (("none", 0), ("l2", 0.5)):
            for decay, acc in ((0.65, 0.6), (0.85, 0.4)):
                make_chain(
                    runs,
                    f"{method}-{attack}",
                    method,
                    attack,
                    eps,
                    {"builtin": (0.92, n), "corruptions": (0.75, n)},
                    decay,
                    robust=robust(acc),
                )
            make_chain(
                runs,
                f"{method}-{attack}",
                method,
                attack,
                eps,
                {"builtin": (0.9, n)},
                1.0,
                optim="sgd_transfer",
            )
            make_chain(
                runs,
                f"{method}-{attack}",
                method,
                attack,
                eps,
                {"cifar10": (0.95, 500)},
                0.85,
                data="cifar10",
            )
    out = tmp_path / "report"
    written = {p.name for p in build_report([runs], out, note=lambda _m: None)}
    assert {
        "fig1_eps.png",
        "fig2_variants.png",
        "fig3_layer_decay.png",
        "fig5_robust_vs_decay.png",
        "table1_transfer.md",
        "table1_transfer.csv",
        "summary.md",
        "fig1_eps.csv",
        "fig5_robust_vs_decay.csv",
    } <= written
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig5 = list(csv.DictReader((out / "fig5_robust_vs_decay.csv").read_text().splitlines()))
    curve = {(r["method"], r["layer_decay"], r["eval_radius"]): float(r["robust"]) for r in fig5}
    assert curve[("mae", "0.65", "0.25")] == pytest.approx(0.6) and curve[
        ("byol", "0.85", "0.5")
    ] == pytest.approx(0.2)
    table = (out / "table1_transfer.md").read_text()
    assert "[paper 98.03]" in table  # MAE nominal, AdamW, CIFAR-10: the paper's value beside ours
    assert "[paper 98.00]" in table  # MAE l2, SGD
    average = next(line for line in table.splitlines() if line.startswith("| average"))
    assert "paper" not in average  # the paper's average covers five datasets, ours one: not comparable
    summary = (out / "summary.md").read_text()
    assert "Best radius per method and attack" in summary and "± " in summary


def test_missing_pieces_are_skipped_with_a_note_never_a_crash(tmp_path: Path) -> None:
    notes: list[str] = []
    written = build_report([tmp_path / "nothing-here", tmp_path], tmp_path / "r", note=notes.append)
    assert [p.name for p in written] == ["summary.md"]
    assert any("does not exist" in n for n in notes) and any("no evaluation runs" in n for n in notes)
    # an evaluation whose fine-tuned model is gone, and one without a scratch baseline or layer decays
    orphan = tmp_path / "runs" / "evaluate" / "x"
    orphan.mkdir(parents=True)
    (orphan / "results.json").write_text(json.dumps({"checkpoint": "/gone/model.safetensors", "sets": {}}))
    make_chain(
        tmp_path / "runs", "mae-l2", "mae", "l2", 0.5, {"builtin": (0.9, 100), "corruptions": (0.5, 100)}
    )
    notes.clear()
    written = {p.name for p in build_report([tmp_path / "runs"], tmp_path / "r2", note=notes.append)}
    assert "fig1_eps.png" in written and "fig3_layer_decay.png" not in written
    assert any("no model.json" in n for n in notes)
    assert any("no from-scratch model" in n for n in notes) and any(n.startswith("fig3:") for n in notes)
    assert "## Notes" in (tmp_path / "r2" / "summary.md").read_text()


def test_paper_table1_averages_are_the_means_of_its_datasets() -> None:
    table = paper_values()["table1"]
    sets = ("cifar10", "cifar100", "sun397", "resisc45", "dmlab")
    for method, by_attack in table["average"].items():
        for attack, by_optim in by_attack.items():
            for optim, stated in by_optim.items():
                assert sum(table[d][method][attack][optim] for d in sets) / 5 == pytest.approx(
                    stated, abs=0.011
                )


def test_table1_markdown_lays_out_datasets_by_arms_with_the_average() -> None:
    est = lambda p: intervals.accuracy([(p, 1000)])  # noqa: E731
    cells = [
        {
            "data": d,
            "method": "mae",
            "attack": a,
            "radius": r,
            "optim": "adamw_lld",
            "layer_decay": 0.65,
            "top1": est(p),
        }
        for d, a, r, p in (
            ("cifar10", "none", "-", 0.9),
            ("cifar10", "l2", "0.5", 0.92),
            ("cifar100", "none", "-", 0.7),
            ("cifar100", "l2", "0.5", 0.74),
        )
    ]
    text = table1_markdown(cells, None)
    lines = text.splitlines()
    assert lines[0] == "| dataset | optimiser | MAE nominal | MAE l2 0.5 |"
    average = next(line for line in lines if line.startswith("| average"))
    assert "80.00" in average and "83.00" in average


def test_radius_labels_follow_the_paper() -> None:
    assert radius_label("linf", 4 / 255) == "4/255" and radius_label("linf", "2/255") == "2/255"
    assert radius_label("l2", 2.0) == "2" and radius_label("none", 0) == "-"


def test_report_command_needs_at_least_one_existing_folder(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from advpt.errors import UserError
    from advpt.report import check

    with pytest.raises(UserError, match="does not exist"):
        check(OmegaConf.create({"runs": [str(tmp_path / "a"), str(tmp_path / "b")]}))
    check(OmegaConf.create({"runs": [str(tmp_path), str(tmp_path / "b")]}))  # the missing one: a note later


# -- paired differences: evaluations that wrote outcomes.npz -----------------------------------------


def test_report_pairs_evaluations_that_share_outcomes_and_falls_back_for_the_others(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    difficulty = {
        "builtin": rng.random(120),
        "corruptions/fog/1": rng.random(40),
        "corruptions/fog/2": rng.random(40),
    }
    difficulty["robust/l2/0.5"] = rng.random(64)
    runs = tmp_path / "runs"
    chain_with_outcomes(runs, "scratch", "scratch", "none", 0, 0.6, difficulty, rng, decay=1.0)
    chain_with_outcomes(runs, "mae-none", "mae", "none", 0, 0.65, difficulty, rng)
    for decay, skill in ((0.65, 0.7), (0.85, 0.75)):
        chain_with_outcomes(runs, "mae-l2", "mae", "l2", 0.5, skill, difficulty, rng, decay=decay)
    chain_with_outcomes(runs, "mae-l2", "mae", "l2", 0.5, 0.6, difficulty, rng, optim="sgd_transfer")
    rotnet = chain_with_outcomes(runs, "rotnet", "rotnet", "none", 0, 0.7, difficulty, rng, outcomes=False)
    byol = chain_with_outcomes(runs, "byol", "byol", "none", 0, 0.7, difficulty, rng, ids_from=1000)

    main, _ = agg.headline_rows(collect([runs]))
    table, base = agg.fig1(main)
    by_arm = {r["method"] + "-" + r["attack"]: r for r in table}
    gain = by_arm["mae-l2"]["minus_scratch"]
    unpaired = intervals.difference(by_arm["mae-l2"]["average"], base)
    assert gain.interval == "paired" and gain.p is None  # two sets: the bootstrap alone
    assert gain.mean == pytest.approx(unpaired.mean, abs=1e-12)
    assert gain.half < 0.8 * unpaired.half  # correlated arms: the paired interval is narrower
    assert by_arm["mae-l2"]["minus_nominal"].interval == "paired"
    lacking = by_arm["rotnet-none"]["minus_scratch"]
    assert lacking.interval == "unpaired" and lacking.fallback == f"{rotnet} has no readable outcomes.npz"
    other = by_arm["byol-none"]["minus_scratch"]
    assert other.interval == "unpaired" and "scored different images" in other.fallback
    assert str(byol) in other.fallback

    # one set of one seed per arm (l2 robust accuracy, γ 0.85 against 0.65): McNemar's p comes with it
    (point,) = [p for p in agg.fig5(main) if p["layer_decay"] == 0.85]
    assert point["minus_smallest_decay"].interval == "paired" and point["minus_smallest_decay"].p is not None

    # Table 1: SGD against AdamW on the test split, one set of one seed each
    (sgd,) = [c for c in agg.table1(collect([runs]), agg.best_by_arm(main)) if c["optim"] == "sgd_transfer"]
    assert sgd["minus_adamw_lld"].interval == "paired" and sgd["minus_adamw_lld"].p is not None

    notes: list[str] = []
    build_report([runs], tmp_path / "report", note=notes.append)
    assert f"fig1: unpaired interval: {rotnet} has no readable outcomes.npz" in notes
    assert any(n.startswith("fig1: unpaired interval:") and "different images" in n for n in notes)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert " paired" in summary and " unpaired" in summary and "McNemar p=" in summary
    assert "Each other optimiser against adamw_lld" in summary
    fig1 = list(csv.DictReader((tmp_path / "report" / "fig1_eps.csv").read_text().splitlines()))
    assert {r["minus_scratch_interval"] for r in fig1} == {"paired", "unpaired"}


def test_a_full_evaluation_with_another_optimiser_is_not_one_more_seed_of_the_headline(
    tmp_path: Path,
) -> None:
    sets = {"builtin": (0.9, 100), "corruptions": (0.7, 100)}
    make_chain(tmp_path, "mae", "mae", "l2", 0.5, sets, 0.85)
    make_chain(tmp_path, "mae", "mae", "l2", 0.5, sets, 0.65)
    # the same encoder transferred with SGD and scored on every set: a transfer run, not a seed
    make_chain(
        tmp_path,
        "mae",
        "mae",
        "l2",
        0.5,
        {"builtin": (0.2, 100), "corruptions": (0.1, 100)},
        1.0,
        optim="sgd_transfer",
    )
    main, _ = agg.headline_rows(collect([tmp_path]))
    assert {r["optim"] for r in main} == {"adamw_lld"} and len(main) == 2
    (row,) = agg.fig1(main)[0]
    assert row["average"].mean == pytest.approx(0.8) and row["average"].seeds == 1


def test_fig5_leaves_out_a_radius_that_was_not_attacked(tmp_path: Path) -> None:
    sets = {"builtin": (0.9, 100), "corruptions": (0.7, 100)}
    for decay in (0.65, 0.85):
        robust = {"l2": {"0.25": (0.5, 64), "1.0": (None, 0)}}
        make_chain(tmp_path, "mae", "mae", "l2", 0.5, sets, decay, robust=robust)
    points = agg.fig5(agg.headline_rows(collect([tmp_path]))[0])
    assert {p["eval_radius"] for p in points} == {"0.25"} and len(points) == 2
    build_report([tmp_path], tmp_path / "report", note=lambda _m: None)
    assert (tmp_path / "report" / "fig5_robust_vs_decay.png").is_file()


def test_every_arm_is_shown_fine_tuned_probed_and_by_knn_and_probes_stay_out_of_table1(
    tmp_path: Path,
) -> None:
    from advpt.report.collect import knn_results

    root = tmp_path / "runs"
    full = {"builtin": (0.80, 360), "corruptions": (0.5, 100)}
    make_chain(root, "mae-none", "mae", "none", 0, full)
    make_chain(
        root, "mae-none", "mae", "none", 0, {"builtin": (0.60, 360)}, layer_decay=1.0, optim="linear_probe"
    )
    make_chain(root, "scratch", "scratch", "none", 0, full, layer_decay=1.0)
    # pretrain with eps_224 recorded, as a run at 32 px writes it: the label shows the paper's units
    pre = root / "pretrain" / "mae-l2"
    pre.mkdir(parents=True)
    config = {
        "method": {"name": "mae"},
        "attack": {"name": "l2"},
        "eps": 0.0714285,
        "eps_224": 0.5,
        "seed": 0,
    }
    (pre / "config.yaml").write_text(yaml.safe_dump(config))
    for name, source, top1 in (("a", root / "pretrain" / "mae-none", 0.41), ("b", pre, 0.45)):
        (root / "knn" / name).mkdir(parents=True)
        knn = {"top1": top1, "robust_top1": top1 - 0.1, "norm": "l2", "eps": 0.0714, "queries": 360}
        results = {"checkpoint": str(source), "suite": "knn", "knn": knn}
        (root / "knn" / name / "results.json").write_text(json.dumps(results))
    notes: list[str] = []
    assert {r["radius"] for r in knn_results([root])} == {"-", "0.0714 (0.5 @224px)"}
    written = build_report([root], tmp_path / "report", note=notes.append)
    assert not any("not an evaluation result" in n for n in notes)  # kNN results are read, not skipped
    with (tmp_path / "report" / "frozen_features.csv").open() as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert float(table["MAE nominal"]["knn"]) == pytest.approx(0.41)
    assert float(table["MAE nominal"]["probe"]) == pytest.approx(0.60)
    assert float(table["MAE nominal"]["finetune"]) == pytest.approx(0.80)
    assert float(table["MAE l2 0.0714 (0.5 @224px)"]["knn"]) == pytest.approx(0.45)
    (scratch,) = [row for arm, row in table.items() if arm.startswith("scratch")]
    assert float(scratch["finetune"]) == pytest.approx(0.80) and scratch["probe"] in ("", "None")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Fine-tuning, linear probe and kNN of every arm" in summary
    table1 = next((p for p in written if p.name == "table1_transfer.csv"), None)
    assert table1 is None or "linear_probe" not in table1.read_text()


def test_runs_cut_short_by_max_steps_are_flagged_and_real_schedules_are_not(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_chain(runs, "mae-none", "mae", "none", 0, {"builtin": (0.9, 100)})
    make_chain(runs, "byol-none", "byol", "none", 0, {"builtin": (0.8, 100)})
    make_chain(runs, "rotnet-none", "rotnet", "none", 0, {"builtin": (0.8, 100)})

    def trained(directory: Path, trainer: dict, steps: int) -> None:
        config = yaml.safe_load((directory / "config.yaml").read_text())
        (directory / "config.yaml").write_text(yaml.safe_dump({**config, "trainer": trainer}))
        (directory / "run.json").write_text(json.dumps({"command": "pretrain", "steps": steps}))

    trained(runs / "pretrain" / "mae-none", {"max_epochs": 10, "max_steps": 20}, 20)  # a test run
    trained(runs / "pretrain" / "byol-none", {"max_epochs": 10, "max_steps": 5000}, 230)  # epochs ended it
    trained(runs / "pretrain" / "rotnet-none", {"max_epochs": -1, "max_steps": 2500}, 2500)  # a step schedule
    rows = {r["method"]: r for r in collect([runs])}
    assert rows["mae"]["cut_short"] == [
        "pretrain/mae-none: 20 steps (trainer.max_steps=20, before max_epochs=10)"
    ]
    assert rows["byol"]["cut_short"] == [] and rows["rotnet"]["cut_short"] == []
    build_report([runs], tmp_path / "report", note=lambda _m: None)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**1 of 3 evaluations come from runs cut short by trainer.max_steps**" in summary
    assert "pretrain/mae-none: 20 steps" in summary and "byol-none:" not in summary
