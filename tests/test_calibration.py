"""Calibration (deviation vs true error on the labelled frames), the held-out cells and the report."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.calibration import calibration, rank, spearman
from pipeline.data.netcdf import write_frames
from pipeline.examples import emt_bulk_frames


def test_rank_gives_ties_their_mean_rank():
    assert rank(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_spearman_is_one_for_any_increasing_map_and_minus_one_for_a_decreasing_one():
    x = np.random.default_rng(0).random(50)
    assert spearman(x, np.exp(5 * x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    assert spearman(x[:2], x[:2]) is None  # too few frames
    assert spearman(x, np.ones_like(x)) is None  # a constant has no ranks


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, 40).astype(float), rng.random(40) + 0.1 * rng.integers(0, 6, 40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Cu frames at two temperatures, as labelled frames carry them (max_devi_f recorded by the
    exploration), and two tiny Cu models."""
    from pipeline.model.config import parse_model_config
    from pipeline.model.deeppot import DeepPot

    d = tmp_path_factory.mktemp("cal")
    ds = emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=3, seed=4)
    ds = ds.assign_coords(max_devi_f=("frame", np.linspace(0.05, 0.3, ds.sizes["frame"])))
    write_frames(d / "frames.nc", ds.assign_attrs(system="cu"))
    cfg = parse_model_config({"type_map": ["Cu"], "descriptor": {"sel": [48], "rcut": 4.0, "rcut_smth": 2.0, "neuron": [4, 8], "axis_neuron": 4}, "fitting_net": {"neuron": [8, 8]}})
    models = [DeepPot(cfg, seed=s).eval() for s in (1, 2)]
    return d, ds, models


def test_calibration_true_error_is_the_ensemble_mean_force_error(labelled, tmp_path):
    from pipeline.evaluate import predict

    d, ds, models = labelled
    c = calibration(models, d / "frames.nc", tmp_path / "cal.json")
    mean_f = np.mean([predict(m, ds)["force"] for m in models], axis=0)
    err = mean_f - ds["force"].values
    fr = c["frames"]
    assert c["nframes"] == ds.sizes["frame"] == len(fr["max_true_f"])
    assert np.allclose(fr["max_true_f"], np.linalg.norm(err, axis=-1).max(1))
    assert np.allclose(fr["rmse_true_f"], np.sqrt((err**2).reshape(len(err), -1).mean(1)))
    assert fr["max_devi_f"] == pytest.approx(ds["max_devi_f"].values.tolist())  # what the selection saw
    assert sorted(set(fr["temperature_K"])) == [300.0, 900.0] and set(fr["system"]) == {"example-Cu-T300", "example-Cu-T900"}  # the task per frame
    assert c["spearman_devi_vs_true_max_f"] == pytest.approx(spearman(np.array(fr["max_devi_f"]), np.array(fr["max_true_f"])))
    assert json.loads((tmp_path / "cal.json").read_text())["nframes"] == c["nframes"]


def test_calibration_recomputes_a_missing_deviation_and_handles_no_labels(labelled, tmp_path):
    from pipeline.evaluate import predict
    from pipeline.explore.deviation import model_deviation

    d, ds, models = labelled
    write_frames(tmp_path / "plain.nc", ds.drop_vars("max_devi_f"))
    c = calibration(models, tmp_path / "plain.nc")
    preds = [predict(m, ds) for m in models]
    want = model_deviation(np.stack([p["energy"] for p in preds]), np.stack([p["force"] for p in preds]))["max_devi_f"]
    assert np.allclose(c["frames"]["max_devi_f"], want)
    empty = calibration(models, [])
    assert empty["nframes"] == 0 and empty["spearman_devi_vs_true_max_f"] is None


def test_evaluate_reports_every_system_temperature_cell(labelled, tmp_path):
    from pipeline.evaluate import evaluate_ensemble

    d, ds, models = labelled
    r = evaluate_ensemble(models, [d / "frames.nc"], tmp_path / "m.json")
    cells = r["cells"]
    assert [(c["system"], c["temperature_K"], c["nframes"]) for c in cells] == [("cu", 300.0, 3), ("cu", 900.0, 3)]
    # the cells partition the frames: their squared errors add up to the overall ones
    e2 = sum(c["energy_rmse_per_atom"] ** 2 * c["nframes"] for c in cells) / sum(c["nframes"] for c in cells)
    assert np.sqrt(e2) == pytest.approx(r["ensemble_mean"]["energy_rmse_per_atom"])
    f2 = sum(c["force_rmse"] ** 2 for c in cells) / 2
    assert np.sqrt(f2) == pytest.approx(r["ensemble_mean"]["force_rmse"])
    assert cells[0]["force_rmse"] != cells[1]["force_rmse"]


def _iteration(root: Path, i: int, cal: dict | None) -> Path:
    d = root / "iter" / f"{i:03d}"
    for sub in ("select", "label", "eval", "explore", "train"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "select" / "report.json").write_text(json.dumps({"frames": 10, "counts": {"accurate": 8, "candidate": 2, "failed": 0}, "ratios": {"accurate": 0.8, "candidate": 0.2, "failed": 0.0}, "trust_lo": 0.1, "trust_hi": 0.3, "selected": 2}))
    (d / "label" / "summary.json").write_text(json.dumps({"labelled": 2, "failed": 0}))
    (d / "eval" / "metrics.json").write_text(json.dumps({"ensemble_mean": {"energy_rmse_per_atom": 0.002, "force_rmse": 0.05}, "cells": [{"system": "cu", "temperature_K": 300.0, "force_rmse": 0.05}]}))
    if cal is not None:
        (d / "eval" / "calibration.json").write_text(json.dumps(cal))
    return d


def test_report_carries_the_calibration_of_every_iteration(tmp_path):
    import csv

    from pipeline.report import write_report

    x = [0.11, 0.15, 0.2, 0.25]
    cal = {"nframes": 4, "spearman_devi_vs_true_max_f": 0.8, "median_true_over_devi": 0.7, "frames": {"max_devi_f": x, "max_true_f": [0.1, 0.1, 0.2, 0.3], "temperature_K": [300, 300, 600, 600]}}
    dirs = [_iteration(tmp_path, 0, cal), _iteration(tmp_path, 1, None)]  # an iteration without calibration (older run) still reports
    s = write_report(dirs, [0, 0], tmp_path / "reports", finished=True, n_stages=1)
    assert [c["spearman_devi_vs_true_f"] for c in s["calibration"]] == [0.8, None]
    assert s["calibration"][0]["labelled_frames"] == 4
    assert s["final_holdout_cells"] == [{"system": "cu", "temperature_K": 300.0, "force_rmse": 0.05}]
    rows = list(csv.DictReader((tmp_path / "reports" / "iterations.csv").open()))
    assert float(rows[0]["spearman_devi_vs_true_f"]) == 0.8 and rows[1]["spearman_devi_vs_true_f"] == "nan"
    png = (tmp_path / "reports" / "calibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
