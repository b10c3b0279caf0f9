"""Model accuracy on labelled frames: ``dpelt test``.

Energy errors are per atom (eV/atom: RMSE of ΔE/N over frames), force errors per
component (eV/Å), virial errors per atom (eV/atom). Systems are combined weighting each
frame (energy, virial) or each force component equally.
"""

from __future__ import annotations

import contextlib

import os
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from .data.frames import formula, type_map_of
from .data.io import read_systems
from .errors import DataError
from .fileio import atomic_path, write_json_atomic
from .model.deeppot import DeepPot
from .model.inputs import frame_inputs


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module):
    """Within: no parameter of ``model`` requires a gradient, and the model is in eval mode;
    both restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    training = model.training
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(training)


def predict(model: DeepPot, ds: xr.Dataset, chunk: int = 8, source: str = "<frames>") -> dict:
    """Energy [nf] eV, forces [nf, natoms, 3] eV/Å and virial [nf, 3, 3] eV for every frame."""
    if type_map_of(ds) != list(model.type_map):
        raise DataError(f"type_map {type_map_of(ds)} differs from the model's {list(model.type_map)}", path=source, key="type_map")
    pbc = ds["pbc"].values.astype(bool)
    atype = ds["atom_type"].values.astype(np.int64)
    coord, cell = ds["coord"].values, ds["cell"].values
    energy, force, virial = [], [], []
    with frozen_weights(model):  # no weight gradients wanted: the fused embedding kernel applies
        for start in range(0, coord.shape[0], chunk):
            sl = slice(start, start + chunk)
            rij, nlist, _, partner = frame_inputs(coord[sl], cell[sl], pbc, atype, model.rcut, model.sel, model.type_map, on_overflow="error", where=f"{source} frame")
            out = model.forward_rij(rij, nlist, torch.from_numpy(atype), True, True, False, partner)
            energy.append(out["energy"].detach().numpy())
            force.append(out["force"].detach().numpy())
            virial.append(out["virial"].detach().numpy())
    return {"energy": np.concatenate(energy), "force": np.concatenate(force), "virial": np.concatenate(virial)}


def _sums(pred: dict, ds: xr.Dataset) -> dict:
    n = ds.sizes["atom"]
    de = (pred["energy"] - ds["energy"].values) / n
    df = (pred["force"] - ds["force"].values).ravel()
    s = {"nframes": len(de), "e2": float((de**2).sum()), "e1": float(np.abs(de).sum()), "nf": len(df), "f2": float((df**2).sum()), "f1": float(np.abs(df).sum())}
    if "virial" in ds:
        dv = ((pred["virial"] - ds["virial"].values) / n).ravel()
        s.update({"nv": len(dv), "v2": float((dv**2).sum()), "v1": float(np.abs(dv).sum())})
    return s


def _metrics(s: dict) -> dict:
    out = {
        "nframes": s["nframes"],
        "energy_rmse_per_atom": np.sqrt(s["e2"] / s["nframes"]),
        "energy_mae_per_atom": s["e1"] / s["nframes"],
        "force_rmse": np.sqrt(s["f2"] / s["nf"]),
        "force_mae": s["f1"] / s["nf"],
    }
    if s.get("nv"):
        out["virial_rmse_per_atom"] = np.sqrt(s["v2"] / s["nv"])
        out["virial_mae_per_atom"] = s["v1"] / s["nv"]
    return {k: (float(v) if not isinstance(v, int) else v) for k, v in out.items()}


def parity_plot(path: str | os.PathLike, e_ref: np.ndarray, e_pred: np.ndarray, f_ref: np.ndarray, f_pred: np.ndarray, title: str = "") -> None:
    """Energy-per-atom and force-component parity plots side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, ref, pr, label in ((axes[0], e_ref, e_pred, "energy (eV/atom)"), (axes[1], f_ref, f_pred, "force component (eV/Å)")):
        ax.scatter(ref, pr, s=3, alpha=0.5)
        lo, hi = float(min(ref.min(), pr.min())), float(max(ref.max(), pr.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        rmse = float(np.sqrt(np.mean((pr - ref) ** 2)))
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"model {label}")
        ax.set_title(f"RMSE {rmse:.3g}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def message_plot(path: str | os.PathLike, text: str) -> None:
    """A PNG that only says ``text`` (so a plot output always exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def test_model(model: DeepPot, systems: Sequence[str | os.PathLike], out_json: str | os.PathLike | None = None, plot: str | os.PathLike | None = None) -> dict:
    """Errors of ``model`` on every labelled system under ``systems``; optionally JSON + parity PNG."""
    per_system, total = [], {}
    e_ref, e_pred, f_ref, f_pred = [], [], [], []
    for path in systems:
        for k, ds in enumerate(read_systems(path, type_map=model.type_map, require_labels=True)):
            src = f"{path}" + (f"#{k}" if k else "")
            pred = predict(model, ds, source=src)
            s = _sums(pred, ds)
            per_system.append({"system": src, "formula": formula(ds)} | _metrics(s))
            for key, v in s.items():
                total[key] = total.get(key, 0) + v
            n = ds.sizes["atom"]
            e_ref.append(ds["energy"].values / n)
            e_pred.append(pred["energy"] / n)
            f_ref.append(ds["force"].values.ravel())
            f_pred.append(pred["force"].ravel())
    result = {"systems": per_system, "overall": _metrics(total)}
    if out_json:
        write_json_atomic(out_json, result)
    if plot:
        parity_plot(plot, np.concatenate(e_ref), np.concatenate(e_pred), np.concatenate(f_ref), np.concatenate(f_pred))
    return result


def _add_cells(cells: dict, ds: xr.Dataset, pred: dict) -> None:
    """Add the error sums of ``pred`` on ``ds`` to ``cells``, one per (system, temperature):
    the held-out set's composition × temperature grid (``system`` attribute, ``temperature_K``
    coordinate; the formula and None where missing)."""
    system = str(ds.attrs.get("system", "")) or formula(ds)
    temps = ds["temperature_K"].values if "temperature_K" in ds.coords else np.full(ds.sizes["frame"], np.nan)
    finite = np.isfinite(temps)
    groups = [(float(T), np.flatnonzero(temps == T)) for T in np.unique(temps[finite])] + ([(None, np.flatnonzero(~finite))] if not finite.all() else [])
    for T, idx in groups:
        key = (system, T)
        part = {k: pred[k][idx] for k in ("energy", "force", "virial")}
        for k2, v in _sums(part, ds.isel(frame=idx)).items():
            cells.setdefault(key, {})[k2] = cells.setdefault(key, {}).get(k2, 0) + v


def evaluate_ensemble(models: Sequence[DeepPot], systems: Sequence[str | os.PathLike], out_json: str | os.PathLike, plot: str | os.PathLike | None = None) -> dict:
    """Errors of every member and of the ensemble mean on labelled frames, plus the deviation there.

    Written to ``out_json``: ``members`` (overall metrics per member), ``ensemble_mean``
    (metrics of the mean prediction), ``max_devi_f`` (mean and max over frames, eV/Å),
    ``nframes``. ``plot``: parity plot of the ensemble mean.
    """
    from .explore.deviation import model_deviation

    member_sums = [dict() for _ in models]
    mean_sums: dict = {}
    cells: dict[tuple, dict] = {}
    devi = []
    e_ref, e_pred, f_ref, f_pred = [], [], [], []
    for path in systems:
        for ds in read_systems(path, type_map=models[0].type_map, require_labels=True):
            if ds.sizes["frame"] == 0:
                continue
            preds = [predict(m, ds, source=str(path)) for m in models]
            for k, p in enumerate(preds):
                for key, v in _sums(p, ds).items():
                    member_sums[k][key] = member_sums[k].get(key, 0) + v
            mean = {key: np.mean([p[key] for p in preds], axis=0) for key in ("energy", "force", "virial")}
            for key, v in _sums(mean, ds).items():
                mean_sums[key] = mean_sums.get(key, 0) + v
            _add_cells(cells, ds, mean)
            dev = model_deviation(np.stack([p["energy"] for p in preds]), np.stack([p["force"] for p in preds]))
            devi.append(dev["max_devi_f"])
            n = ds.sizes["atom"]
            e_ref.append(ds["energy"].values / n)
            e_pred.append(mean["energy"] / n)
            f_ref.append(ds["force"].values.ravel())
            f_pred.append(mean["force"].ravel())
    if not devi:
        result = {"nframes": 0, "members": [], "ensemble_mean": None, "max_devi_f": None}
        if plot:
            message_plot(plot, "no held-out frames")
    else:
        d = np.concatenate(devi)
        result = {
            "nframes": int(len(d)),
            "members": [_metrics(s) for s in member_sums],
            "ensemble_mean": _metrics(mean_sums),
            "max_devi_f": {"mean": float(d.mean()), "max": float(d.max())},
            "cells": [{"system": sy, "temperature_K": T} | _metrics(c) for (sy, T), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else -1.0))],
        }
        if plot:
            parity_plot(plot, np.concatenate(e_ref), np.concatenate(e_pred), np.concatenate(f_ref), np.concatenate(f_pred), title="ensemble mean on held-out frames")
    write_json_atomic(out_json, result)
    return result
