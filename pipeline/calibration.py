"""Calibration of the model deviation against the true error, free from the labels.

Every frame an iteration labels was picked by the ensemble's max force deviation
(``max_devi_f``, eV/Å, recorded by the exploration as a coordinate of the frame); once the
oracle has labelled it, the true error of the ensemble there is known too. For each labelled
frame of iteration i, with iteration i's models:

* ``max_devi_f``: the deviation the selection saw (the recorded coordinate; recomputed from the
  models where a frame does not carry it);
* ``max_true_f``: max over atoms of |F̄_i − F^oracle_i| (eV/Å), F̄ the ensemble mean force —
  the quantity ``max_devi_f`` estimates (DeePMD-kit's ``dp model-devi --real_error``);
* ``rmse_true_f``: RMSE over the frame's force components of F̄ − F^oracle (eV/Å).

The summary gives the Spearman rank correlation of ``max_devi_f`` with ``max_true_f`` (does a
larger deviation mean a larger error?) and their ratio (is the deviation's scale right?).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .data.io import read_systems
from .explore.deviation import model_deviation
from .fileio import write_json_atomic


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson correlation of the ranks); None for < 3 frames or a
    constant input (undefined)."""
    if len(x) < 3:
        return None
    rx, ry = rank(x), rank(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return None
    return float(np.mean((rx - rx.mean()) * (ry - ry.mean())) / (sx * sy))


def frame_errors(models: Sequence, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per labelled frame under ``path``: max_devi_f, max_true_f, rmse_true_f (eV/Å), temperature_K,
    system (the exploration task that produced it, else the system's name)."""
    from .evaluate import predict

    out: dict[str, list] = {k: [] for k in ("max_devi_f", "max_true_f", "rmse_true_f", "temperature_K", "system")}
    for ds in read_systems(path, type_map=models[0].type_map, require_labels=True):
        nf = ds.sizes["frame"]
        if nf == 0:
            continue
        preds = [predict(m, ds, source=str(path)) for m in models]
        forces = np.stack([p["force"] for p in preds])  # [M, nf, natoms, 3] eV/Å
        err = forces.mean(0) - ds["force"].values  # [nf, natoms, 3]
        devi = ds["max_devi_f"].values if "max_devi_f" in ds.coords else np.full(nf, np.nan)
        recomputed = model_deviation(np.stack([p["energy"] for p in preds]), forces)["max_devi_f"]
        out["max_devi_f"].append(np.where(np.isfinite(devi), devi, recomputed))
        out["max_true_f"].append(np.linalg.norm(err, axis=-1).max(axis=1))
        out["rmse_true_f"].append(np.sqrt(np.mean(err.reshape(nf, -1) ** 2, axis=1)))
        out["temperature_K"].append(ds["temperature_K"].values if "temperature_K" in ds.coords else np.full(nf, np.nan))
        if "source_task" in ds.coords:  # the exploration task (system_T..): labelled frames carry it
            out["system"] += [str(x) for x in ds["source_task"].values]
        else:
            out["system"] += [str(ds.attrs.get("system", "")) or str(ds.attrs.get("source", ""))] * nf
    return {k: (np.concatenate(v) if k != "system" and v else np.asarray(v, dtype=object if k == "system" else np.float64)) for k, v in out.items()}


def calibration(models: Sequence, path: str | os.PathLike, out_json: str | os.PathLike | None = None) -> dict:
    """Deviation against true error on the labelled frames under ``path`` (see the module
    docstring); written to ``out_json`` with the per-frame values."""
    e = frame_errors(models, path)
    n = len(e["max_devi_f"])
    result: dict = {"nframes": n, "spearman_devi_vs_true_max_f": None, "spearman_devi_vs_true_rmse_f": None}
    if n:
        ratio = e["max_true_f"] / np.maximum(e["max_devi_f"], 1e-12)
        result.update(
            {
                "spearman_devi_vs_true_max_f": spearman(e["max_devi_f"], e["max_true_f"]),
                "spearman_devi_vs_true_rmse_f": spearman(e["max_devi_f"], e["rmse_true_f"]),
                "median_true_over_devi": float(np.median(ratio)),
                "mean_max_devi_f": float(e["max_devi_f"].mean()),
                "mean_max_true_f": float(e["max_true_f"].mean()),
            }
        )
    result["frames"] = {k: [str(x) for x in v] if k == "system" else [float(x) for x in v] for k, v in e.items()}
    if out_json:
        write_json_atomic(out_json, result)
    return result
