"""Run reports: a summary, a table per iteration and plots.

Reads, for every iteration ``iter/NNN``: ``select/report.json`` (accurate/candidate/failed
counts), ``label/summary.json``, ``eval/metrics.json`` (held-out errors), the exploration
frames (deviation histograms) and the learning curves. Writes into ``reports/``:
``summary.json``, ``iterations.csv``, ``ratios.png`` (accurate/candidate/failed ratio per
iteration, stage boundaries marked), ``deviation.png`` (max force deviation histograms with
the trust levels), ``lcurve.png`` (learning curves of member 0), ``parity.png`` (the final
ensemble on the held-out set), ``calibration.png`` (one panel per iteration: max force
deviation against the true force error on the frames it labelled, from
``eval/calibration.json``; the Spearman rank correlation per iteration is in
``iterations.csv`` and ``summary.json``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.netcdf import read_frames
from .fileio import atomic_path, write_json_atomic, write_text_atomic


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)


def iteration_rows(iter_dirs: Sequence[Path], stages: Sequence[int]) -> list[dict]:
    rows = []
    for d, stage in zip(iter_dirs, stages):
        rep = _load(d / "select" / "report.json") or {}
        lab = _load(d / "label" / "summary.json") or {}
        ev = _load(d / "eval" / "metrics.json") or {}
        cal = _load(d / "eval" / "calibration.json") or {}
        mean = ev.get("ensemble_mean") or {}
        counts = rep.get("counts", {})
        rows.append(
            {
                "iteration": int(d.name),
                "stage": int(stage),
                "frames": rep.get("frames", 0),
                "accurate": counts.get("accurate", 0),
                "candidate": counts.get("candidate", 0),
                "failed": counts.get("failed", 0),
                "accurate_ratio": rep.get("ratios", {}).get("accurate", float("nan")),
                "candidate_ratio": rep.get("ratios", {}).get("candidate", float("nan")),
                "failed_ratio": rep.get("ratios", {}).get("failed", float("nan")),
                "converged": bool(rep.get("converged", False)),
                "selected": rep.get("selected", 0),
                "labelled": lab.get("labelled", 0),
                "label_failed": lab.get("failed", 0),
                "holdout_energy_rmse_per_atom": mean.get("energy_rmse_per_atom", float("nan")),
                "holdout_force_rmse": mean.get("force_rmse", float("nan")),
                "holdout_mean_max_devi_f": (ev.get("max_devi_f") or {}).get("mean", float("nan")),
                "calibration_frames": cal.get("nframes", 0),
                "spearman_devi_vs_true_f": _nan(cal.get("spearman_devi_vs_true_max_f")),
                "median_true_over_devi_f": _nan(cal.get("median_true_over_devi")),
                "trust_lo": rep.get("trust_lo", float("nan")),
                "trust_hi": rep.get("trust_hi", float("nan")),
            }
        )
    return rows


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _calibration_plot(iter_dirs: Sequence[Path], rows: list[dict], path: Path) -> None:
    """One panel per iteration: max force deviation (what selected the frame) against the true
    max force error of the ensemble mean on the frames that iteration labelled, log-log, with
    the trust levels and the line error = deviation."""
    plt = _plt()
    n = max(len(iter_dirs), 1)
    ncol = min(n, 4)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.ravel()[len(iter_dirs):]:
        ax.axis("off")
    for ax, d, r in zip(axes.ravel(), iter_dirs, rows):
        cal = _load(d / "eval" / "calibration.json") or {}
        fr = cal.get("frames") or {}
        x, y = np.asarray(fr.get("max_devi_f", []), dtype=float), np.asarray(fr.get("max_true_f", []), dtype=float)
        ax.set_title(f"iter {d.name}: {len(x)} labels, ρ = {r['spearman_devi_vs_true_f']:.2f}" if len(x) else f"iter {d.name}: no labels", fontsize=8)
        if not len(x):
            continue
        T = np.asarray(fr.get("temperature_K", [np.nan] * len(x)), dtype=float)
        sc = ax.scatter(x, y, c=T, s=6, cmap="coolwarm")
        lo, hi = float(min(x.min(), y.min())) * 0.8, float(max(x.max(), y.max())) * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
        for level, col in ((r["trust_lo"], "k"), (r["trust_hi"], "r")):
            if np.isfinite(level):
                ax.axvline(level, color=col, ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("max force deviation (eV/Å)", fontsize=8)
        ax.set_ylabel("true max force error (eV/Å)", fontsize=8)
        if np.isfinite(T).any():
            fig.colorbar(sc, ax=ax, label="T (K)")
    fig.tight_layout()
    _save(fig, path)


def _ratios_plot(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    it = [r["iteration"] for r in rows]
    acc = np.array([r["accurate_ratio"] for r in rows])
    cand = np.array([r["candidate_ratio"] for r in rows])
    fail = np.array([r["failed_ratio"] for r in rows])
    ax.stackplot(it, acc, cand, fail, labels=["accurate", "candidate", "failed"], colors=["#4c9f70", "#f2b134", "#d1495b"], alpha=0.85)
    for k in range(1, len(rows)):
        if rows[k]["stage"] != rows[k - 1]["stage"]:
            ax.axvline(rows[k]["iteration"] - 0.5, color="k", lw=0.8, ls="--")
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of explored frames")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("selection per iteration (dashed: next stage)")
    fig.tight_layout()
    _save(fig, path)


def _deviation_plot(iter_dirs: Sequence[Path], rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    cmap = plt.get_cmap("viridis")
    hi_all = max([r["trust_hi"] for r in rows if np.isfinite(r["trust_hi"])] or [1.0])
    bins = np.linspace(0, 2.5 * hi_all, 60)
    for k, d in enumerate(iter_dirs):
        devi = [ds["max_devi_f"].values for f in sorted((d / "explore").glob("*/frames.nc")) for ds in read_frames(f)]
        if devi:
            v = np.concatenate(devi)
            ax.hist(np.clip(v, 0, bins[-1]), bins=bins, histtype="step", color=cmap(k / max(len(iter_dirs) - 1, 1)), label=f"iter {d.name}")
    if rows:
        ax.axvline(rows[-1]["trust_lo"], color="k", ls="--", lw=0.8, label="trust_lo")
        ax.axvline(rows[-1]["trust_hi"], color="r", ls="--", lw=0.8, label="trust_hi")
    ax.set_xlabel("max force deviation (eV/Å)")
    ax.set_ylabel("frames")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def _lcurve_plot(iter_dirs: Sequence[Path], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    cmap = plt.get_cmap("viridis")
    for k, d in enumerate(iter_dirs):
        f = d / "train" / "lcurve_0.csv"
        if not f.exists():
            continue
        rows = list(csv.DictReader(io.StringIO(f.read_text())))
        if rows and "rmse_f_trn" in rows[0]:
            ax.semilogy([float(r["step"]) for r in rows], [float(r["rmse_f_trn"]) for r in rows], color=cmap(k / max(len(iter_dirs) - 1, 1)), label=f"iter {d.name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("force RMSE on the batch (eV/Å)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def write_report(iter_dirs: Sequence[str | os.PathLike], stages: Sequence[int], out_dir: str | os.PathLike, finished: bool, n_stages: int) -> dict:
    """Write the run's reports from its iteration directories (in order)."""
    iter_dirs = [Path(d) for d in iter_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = iteration_rows(iter_dirs, stages)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    write_text_atomic(out / "iterations.csv", buf.getvalue())
    _ratios_plot(rows, out / "ratios.png")
    _deviation_plot(iter_dirs, rows, out / "deviation.png")
    _lcurve_plot(iter_dirs, out / "lcurve.png")
    _calibration_plot(iter_dirs, rows, out / "calibration.png")
    if iter_dirs and (iter_dirs[-1] / "eval" / "parity.png").exists():
        with atomic_path(out / "parity.png") as tmp:
            shutil.copyfile(iter_dirs[-1] / "eval" / "parity.png", tmp)
    else:
        from .evaluate import message_plot

        message_plot(out / "parity.png", "no held-out evaluation")
    last = rows[-1] if rows else {}
    final_eval = _load(iter_dirs[-1] / "eval" / "metrics.json") if iter_dirs else None
    summary = {
        "iterations": len(rows),
        "stages_finished": (max(r["stage"] for r in rows) + 1 if finished else max(r["stage"] for r in rows)) if rows else 0,
        "stages": n_stages,
        "converged": bool(finished and last.get("converged", False)),
        "finished": bool(finished),
        "labels_total": int(sum(r["labelled"] for r in rows)),
        "label_failures_total": int(sum(r["label_failed"] for r in rows)),
        "final_accurate_ratio": last.get("accurate_ratio"),
        "final_holdout": final_eval,
        "final_holdout_force_rmse": last.get("holdout_force_rmse"),
        "final_holdout_cells": (final_eval or {}).get("cells"),
        "calibration": [{"iteration": r["iteration"], "labelled_frames": r["calibration_frames"], "spearman_devi_vs_true_f": None if np.isnan(r["spearman_devi_vs_true_f"]) else r["spearman_devi_vs_true_f"],
                         "median_true_over_devi_f": None if np.isnan(r["median_true_over_devi_f"]) else r["median_true_over_devi_f"]} for r in rows],
        "per_iteration": rows,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
