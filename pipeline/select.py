"""Selection: trust levels, candidate picking and the convergence decision (DP-GEN vocabulary).

Every explored frame is classified on its maximum force deviation σ (eV/Å), optionally also
on its virial deviation (eV/atom):

    accurate:  σ < trust_lo            (the ensemble agrees: nothing to learn)
    candidate: trust_lo ≤ σ < trust_hi (worth a first-principles label)
    failed:    σ ≥ trust_hi, or σ not finite (too far from the data to trust the geometry)

With virial levels, a frame is failed if either quantity is at or above its upper level,
candidate if either lies in its band, accurate otherwise. At most ``max_labels`` candidates
are picked per iteration, with a seeded generator (or spread out by farthest-point sampling
in descriptor space). The iteration is ``converged`` when the accurate ratio reaches
``conv_accuracy`` and no exploration trajectory had to be stopped by a guard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import xarray as xr

from .data.frames import frame_ids, group_by_system, nframes
from .data.netcdf import read_frames, write_frames
from .errors import ConfigError, DataError
from .fileio import write_json_atomic

ACCURATE, CANDIDATE, FAILED = 0, 1, 2
CLASS_NAMES = ("accurate", "candidate", "failed")


def _schema_default(key: str):
    """A field whose default is the run config schema's ``select.<key>`` (the one place defaults live)."""

    def default():
        from .runconfig import schema_default

        return schema_default(f"select.{key}")

    return field(default_factory=default)


@dataclass(frozen=True)
class SelectConfig:
    """Selection settings (eV/Å for force levels, eV/atom for virial levels); fields left out
    take the schema's defaults of the ``select`` section."""

    trust_lo: float
    trust_hi: float
    v_trust_lo: Optional[float] = None
    v_trust_hi: Optional[float] = None
    max_labels: int = _schema_default("max_labels")
    spread: str = _schema_default("spread")
    adapt_numb_candi: Optional[int] = None
    adapt_perc_candi: float = _schema_default("adapt_perc_candi")
    conv_accuracy: float = _schema_default("conv_accuracy")

    def __post_init__(self) -> None:
        if not (0 <= self.trust_lo < self.trust_hi):
            raise ConfigError(f"need 0 <= trust_lo < trust_hi, got trust_lo={self.trust_lo}, trust_hi={self.trust_hi}", key="trust_lo")
        if (self.v_trust_lo is None) != (self.v_trust_hi is None):
            raise ConfigError("give both v_trust_lo and v_trust_hi, or neither", key="v_trust_lo")
        if self.v_trust_lo is not None and not (0 <= self.v_trust_lo < self.v_trust_hi):
            raise ConfigError(f"need 0 <= v_trust_lo < v_trust_hi, got {self.v_trust_lo}, {self.v_trust_hi}", key="v_trust_lo")
        if self.max_labels < 0:
            raise ConfigError("must be >= 0", key="max_labels")
        if self.spread not in ("random", "fps"):
            raise ConfigError(f"spread must be 'random' or 'fps', got {self.spread!r}", key="spread")
        if not 0 <= self.conv_accuracy <= 1:
            raise ConfigError("must lie in [0, 1]", key="conv_accuracy")


def classify(devi_f: np.ndarray, lo: float, hi: float, devi_v: np.ndarray | None = None, v_lo: float | None = None, v_hi: float | None = None) -> np.ndarray:
    """Class per frame (ACCURATE, CANDIDATE, FAILED) from deviations and trust levels."""
    devi_f = np.asarray(devi_f, dtype=np.float64)
    bad = ~np.isfinite(devi_f)
    failed = bad | (devi_f >= hi)
    candidate = (devi_f >= lo) & ~failed
    if devi_v is not None and v_lo is not None:
        devi_v = np.asarray(devi_v, dtype=np.float64)
        vbad = ~np.isfinite(devi_v)
        failed |= vbad | (devi_v >= v_hi)
        candidate = (candidate | (devi_v >= v_lo)) & ~failed
    out = np.full(devi_f.shape, ACCURATE, dtype=np.int64)
    out[candidate] = CANDIDATE
    out[failed] = FAILED
    return out


def adaptive_candidates(devi_f: np.ndarray, hi: float, numb: int, perc: float) -> np.ndarray:
    """DP-GEN's adaptive lower level: of the frames below ``hi``, the max(numb, perc·n) with the
    largest deviation are candidates. Returns a boolean mask."""
    below = np.flatnonzero(np.isfinite(devi_f) & (devi_f < hi))
    k = min(len(below), max(int(numb), int(np.floor(perc * len(below)))))
    mask = np.zeros(len(devi_f), dtype=bool)
    if k:
        order = below[np.argsort(-devi_f[below], kind="stable")]
        mask[order[:k]] = True
    return mask


def _conditions(ds: xr.Dataset) -> list[tuple]:
    """(task, temperature K, pressure bar) per frame; unknown values as None (NaN is no dict key)."""
    return [(str(t), _num(T), _num(P)) for t, T, P in zip(ds["source_task"].values, ds["temperature_K"].values, ds["pressure_bar"].values)]


def farthest_point_order(features: np.ndarray, first: int) -> np.ndarray:
    """Greedy farthest-point ordering of rows of ``features`` starting at ``first``."""
    n = len(features)
    order = [first]
    dist = np.linalg.norm(features - features[first], axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(features - features[nxt], axis=1))
    return np.asarray(order)


def frame_fingerprints(model, systems: Sequence[xr.Dataset]) -> list[np.ndarray]:
    """Per frame, the mean se_e2_a descriptor over atoms of each type (concatenated)."""
    import torch

    from .model.inputs import frame_inputs

    out = []
    for ds in systems:
        atype = ds["atom_type"].values.astype(np.int64)
        rij, nlist, _, partner = frame_inputs(ds["coord"].values, ds["cell"].values, ds["pbc"].values.astype(bool), atype, model.rcut, model.sel, model.type_map, on_overflow="ignore")
        with torch.no_grad():
            d = model.descriptor(rij.to(model.model_dtype), torch.from_numpy(atype), model.section_counts(nlist), partner).double().numpy()  # [nf, nloc, dim]
        parts = [d[:, atype == t].mean(axis=1) for t in range(model.ntypes) if (atype == t).any()]
        out.append(np.concatenate(parts, axis=1))
    return out


def _task_status(frames_path: str) -> dict | None:
    """The exploration task's summary (``md.json`` beside its ``frames.nc``), if there is one."""
    md = Path(frames_path).with_name("md.json")
    if not md.is_file():
        return None
    try:
        info = json.loads(md.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the task summary: {exc}", path=md) from None
    return info if isinstance(info, dict) else None


def select(
    paths: Sequence[str | os.PathLike],
    cfg: SelectConfig,
    seed: int,
    out_dir: str | os.PathLike,
    model=None,
    iteration: int | None = None,
    labelled_ids: set[str] | None = None,
) -> dict:
    """Classify every explored frame, pick candidates, write ``candidates.nc`` and ``report.json``.

    ``paths`` are exploration outputs (``frames.nc`` with deviation coordinates), read in
    sorted order. Frames already labelled (``labelled_ids``) are never picked again.
    """
    out_dir = Path(out_dir)
    systems: list[xr.Dataset] = []
    sources: list[str] = []
    stopped: list[dict] = []  # trajectories cut by a guard (blow-up, atoms too close, ...)
    for p in sorted(map(str, paths)):
        status = _task_status(p)
        for ds in read_frames(p):
            if "max_devi_f" not in ds.coords:
                raise DataError("exploration frames need the max_devi_f coordinate", path=p, key="max_devi_f")
            if status is None and ds.attrs.get("status") == "stopped":
                status = {"status": "stopped", "reason": str(ds.attrs.get("reason", "")), "steps_done": int(ds.attrs.get("steps_done", -1))}
            if nframes(ds):
                systems.append(ds)
                sources.append(p)
        if status is not None and status.get("status") == "stopped":
            stopped.append({"task": p, "reason": status.get("reason", ""), "steps_done": status.get("steps_done")})
    per_condition: dict[tuple, np.ndarray] = {}
    classes, candidate_masks = [], []
    for ds in systems:
        devi_f = ds["max_devi_f"].values
        devi_v = ds["max_devi_v"].values if "max_devi_v" in ds.coords and cfg.v_trust_lo is not None else None
        if cfg.adapt_numb_candi is not None:
            c = classify(devi_f, cfg.trust_hi, cfg.trust_hi, devi_v, cfg.v_trust_lo, cfg.v_trust_hi)
            adaptive = adaptive_candidates(devi_f, cfg.trust_hi, cfg.adapt_numb_candi, cfg.adapt_perc_candi)
            c[(c == ACCURATE) & adaptive] = CANDIDATE
        else:
            c = classify(devi_f, cfg.trust_lo, cfg.trust_hi, devi_v, cfg.v_trust_lo, cfg.v_trust_hi)
        classes.append(c)
        mask = c == CANDIDATE
        if labelled_ids:
            mask &= ~np.isin(frame_ids(ds), list(labelled_ids))
        candidate_masks.append(mask)
        for cond, cls in zip(_conditions(ds), c):
            per_condition.setdefault(cond, np.zeros(3, dtype=np.int64))[cls] += 1

    # candidates in a fixed order: (file, frame); then a seeded pick of at most max_labels
    pool = [(k, f) for k, m in enumerate(candidate_masks) for f in np.flatnonzero(m)]
    rng = np.random.default_rng(seed)
    if len(pool) <= cfg.max_labels:
        chosen = list(range(len(pool)))
    elif cfg.spread == "fps":
        if model is None:
            raise ConfigError("spread: fps needs a model to compute descriptors", key="spread")
        feats = frame_fingerprints(model, systems)
        width = max(f.shape[1] for f in feats)
        X = np.stack([np.pad(feats[k][f], (0, width - feats[k].shape[1])) for k, f in pool])
        X = (X - X.mean(0)) / (X.std(0) + 1e-12)
        chosen = sorted(farthest_point_order(X, int(rng.integers(len(pool))))[: cfg.max_labels].tolist())
    else:
        chosen = sorted(rng.choice(len(pool), size=cfg.max_labels, replace=False).tolist())
    picked: dict[int, list[int]] = {}
    for c in chosen:
        k, f = pool[c]
        picked.setdefault(k, []).append(int(f))
    parts = [systems[k].isel(frame=fr) for k, fr in sorted(picked.items())]
    candidates = group_by_system(parts) if parts else []

    totals = np.sum([np.bincount(c, minlength=3) for c in classes], axis=0) if classes else np.zeros(3, dtype=np.int64)
    n = int(totals.sum())
    ratios = {name: (float(totals[k] / n) if n else 0.0) for k, name in enumerate(CLASS_NAMES)}
    report = {
        "iteration": iteration,
        "trust_lo": cfg.trust_lo,
        "trust_hi": cfg.trust_hi,
        "v_trust_lo": cfg.v_trust_lo,
        "v_trust_hi": cfg.v_trust_hi,
        "adaptive_trust_lo": cfg.adapt_numb_candi is not None,
        "frames": n,
        "counts": {name: int(totals[k]) for k, name in enumerate(CLASS_NAMES)},
        "ratios": ratios,
        "per_condition": [
            {"task": task, "temperature_K": T, "pressure_bar": P}
            | {name: int(v[k]) for k, name in enumerate(CLASS_NAMES)}
            | {f"{name}_ratio": float(v[k] / v.sum()) for k, name in enumerate(CLASS_NAMES)}
            for (task, T, P), v in sorted(per_condition.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0, kv[0][2] or 0.0))
        ],
        "candidates_available": len(pool),
        "selected": len(chosen),
        "max_labels": cfg.max_labels,
        "spread": cfg.spread,
        "seed": int(seed),
        "conv_accuracy": cfg.conv_accuracy,
        # a trajectory the guards had to stop is an exploration the models do not get right,
        # whatever the ratio of the frames it kept before
        "stopped_tasks": stopped,
        "converged": bool(n > 0 and ratios["accurate"] >= cfg.conv_accuracy and not stopped),
        "sources": sorted(set(sources)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_frames(out_dir / "candidates.nc", candidates)
    write_json_atomic(out_dir / "report.json", report)
    return report


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x
