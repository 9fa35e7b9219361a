"""The report's fine-tuning convergence check on hand-written metrics.csv files: no training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import make_chain

from advpt.report import build_report
from advpt.report.collect import val_curve
from advpt.report.convergence import THRESHOLD, convergence, gain, unconverged, window

HEADER = ["epoch", "step", "train/loss", "val/top1"]


def write_metrics(folder: Path, values: list[float], extra: list[tuple[int, float]] = ()) -> Path:
    """A CSVLogger metrics.csv: a training row and a validation row per epoch (epoch counted from 0),
    then ``extra`` validation rows (epoch from 0, value) as a resumed run appends them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for epoch, value in [*enumerate(values), *extra]:
        rows.append({"epoch": epoch, "step": 10 * epoch + 5, "train/loss": 1.0, "val/top1": ""})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "train/loss": "", "val/top1": value})
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return folder / "metrics.csv"


def curve(values: list[float]) -> list[tuple[int, float]]:
    return list(enumerate(values, start=1))


def test_the_tail_spans_a_fifth_of_the_epochs_and_at_least_one() -> None:
    assert window(20) == 4 and window(3) == 1 and window(1) == 1 and window(21) == 5


def test_a_tail_climbing_through_its_window_gains_its_whole_climb_and_is_flagged() -> None:
    values = [0.5 + 0.02 * i for i in range(15)] + [0.90, 0.904, 0.908, 0.912, 0.916, 0.920]
    gained = gain(curve(values))  # 21 epochs: window 5, v_16 .. v_21 a steady 0.004 an epoch from 0.90
    assert gained == pytest.approx(0.020) and unconverged(gained)


def test_a_noisy_flat_tail_is_not_flagged() -> None:
    values = [0.5 + 0.02 * i for i in range(15)] + [0.90, 0.903, 0.899, 0.902, 0.900]
    gained = gain(curve(values))
    assert abs(gained) < 0.003 and not unconverged(gained)


def test_one_dip_at_the_windows_start_is_not_a_gain() -> None:
    # a run that has stopped improving, one epoch 1.6 points low where the window starts: v_E - v_(E-k)
    # would read +1.6 points; the trend reads the flat epochs around it
    values = [0.5 + 0.02 * i for i in range(23)] + [0.942, 0.956, 0.958, 0.958, 0.956, 0.958, 0.958]
    assert window(30) == 6 and values[-1] - values[-7] == pytest.approx(0.016)
    gained = gain(curve(values))
    assert gained is not None and gained < THRESHOLD / 2 and not unconverged(gained)


def test_a_step_taken_early_in_the_window_and_held_is_not_a_gain() -> None:
    values = [0.5 + 0.02 * i for i in range(23)] + [0.9667] + [0.9833] * 6
    gained = gain(curve(values))  # 30 epochs: window 6, v_24 .. v_30 = 0.9667, then held at 0.9833
    assert gained == pytest.approx(0.0) and not unconverged(gained)


def test_the_gain_is_the_median_of_the_pairwise_slopes_times_the_window() -> None:
    values = [0.3, 0.5, 0.6, 0.7, 0.71, 0.74, 0.72, 0.78, 0.75, 0.77, 0.8]  # 11 epochs: window 3
    tail = list(enumerate(values[-4:]))
    slopes = sorted((b - a) / (j - i) for i, a in tail for j, b in tail if j > i)
    median = (slopes[2] + slopes[3]) / 2  # 6 slopes
    assert gain(curve(values)) == pytest.approx(3 * median, abs=1e-6)


def test_a_gain_exactly_at_the_threshold_is_not_flagged() -> None:
    gained = gain(curve([0.5] * 15 + [0.90, 0.9025, 0.905, 0.9075, 0.91]))  # 0.0025 an epoch, 4 epochs
    assert gained == pytest.approx(THRESHOLD) and not unconverged(gained)


def test_three_epochs_compare_the_last_with_the_one_before() -> None:
    assert gain(curve([0.1, 0.5, 0.52])) == pytest.approx(0.02)


def test_one_epoch_has_no_gain_and_is_not_flagged() -> None:
    assert gain(curve([0.4])) is None and not unconverged(None)


def test_a_resumed_runs_repeated_epoch_keeps_its_last_value(tmp_path: Path) -> None:
    write_metrics(tmp_path, [0.3, 0.4, 0.45], extra=[(2, 0.47), (3, 0.5)])
    assert val_curve(tmp_path) == [(1, 0.3), (2, 0.4), (3, 0.47), (4, 0.5)]


def test_a_run_without_val_top1_has_no_curve_and_is_left_out(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_text("epoch,step,train/loss\n0,5,1.0\n")
    assert val_curve(bare) == [] and val_curve(tmp_path / "missing") == []
    logged = write_metrics(tmp_path / "logged", [0.2, 0.3]).parent
    row = {"method": "mae", "attack": "none", "radius": "-", "seed": 0, "data": "builtin"}
    rows = [
        {**row, "finetune": str(bare)},
        {**row, "finetune": str(logged)},
        {**row, "finetune": str(logged)},
    ]
    runs = convergence(rows)
    assert [r["finetune"] for r in runs] == [str(logged)]  # one entry per run, however many evaluations
    assert runs[0]["epochs"] == 2 and runs[0]["last"] == [0.2, 0.3] and runs[0]["flagged"]


def test_the_report_shows_convergence_and_names_the_unconverged_run_in_its_notes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sets = {"builtin": (0.9, 100), "corruptions": (0.7, 100)}
    make_chain(runs, "scratch", "scratch", "none", 0, sets, 1.0)
    make_chain(runs, "mae-l2", "mae", "l2", 0.5, sets)
    steady, rising = sorted((runs / "finetune").iterdir(), key=lambda p: "scratch" in p.name)
    write_metrics(steady, [0.5] * 7 + [0.8, 0.8, 0.801])  # mae-l2: flat over its last 2 epochs
    write_metrics(rising, [0.5] * 7 + [0.8, 0.82, 0.85])  # scratch: +5 points over its last 2 epochs
    out = tmp_path / "report"
    written = {p.name for p in build_report([runs], out, note=lambda _m: None)}
    assert "finetune_convergence.csv" in written
    summary = (out / "summary.md").read_text()
    section = summary.split("## Fine-tuning: convergence")[1].split("## Notes")[0]
    assert "1 of 2 runs flagged" in section and "UNCONVERGED" in section and "| ok |" in section
    assert "80.00 82.00 85.00" in section
    notes = summary.split("## Notes")[1]
    assert f"fine-tuning {rising} has not converged: +5.00 points over its last 2 epochs" in notes
    assert str(steady) not in notes
    table = list(csv.DictReader((out / "finetune_convergence.csv").read_text().splitlines()))
    assert {r["flagged"] for r in table} == {"True", "False"} and all(r["last"] for r in table)
