"""The labeling step: every candidate frame through the oracle, checked, with failures recorded.

Files under ``out_dir`` (every one written atomically: a killed job leaves nothing that looks
finished):

``tasks/<frame id>/result.json``
    one per frame the oracle ran on: energy (eV), forces (eV/Å), stress (eV/Å³) or the reason
    it failed, the oracle spec, the wall time. A rerun reuses every finished task whose oracle
    spec is unchanged and only runs the missing ones; file-based calculators (VASP, CP2K …)
    run in this directory. ``error.log`` holds the traceback of a task that crashed.
``failures.json``
    ``[{frame_id, source_task, md_step, reason, task_dir}, …]``: quarantined frames.
``frames.nc``
    the labelled frames: candidates' coordinates and provenance, ``energy`` eV, ``force``
    eV/Å, ``virial`` = -stress·volume eV (periodic systems whose oracle gives stress),
    ``oracle`` set to the oracle name. Not written when too many labels failed.
``summary.json``
    counts: total, duplicates, labelled, reused, failed, computed, cached; the oracle.

A frame whose content id (:func:`pipeline.data.frames.frame_ids`) is found in ``known``
(already labelled frames files, e.g. earlier iterations) is never labelled again: its label
is reused, provided it came from the same oracle (or its oracle is not recorded).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr
from ase.stress import voigt_6_to_full_3x3_stress

from ..data.ase_io import frames_to_atoms
from ..data.frames import LABELS, frame_ids, nframes, remap_types, type_map_of, validate_frames
from ..data.netcdf import read_frames, write_frames
from ..errors import ConfigError, DpeltError
from ..fileio import write_json_atomic, write_text_atomic
from .oracles import Oracle, make_oracle
from .timeout import LabelTimeout, checked_seconds, time_limit
from .validate import MAX_FORCE, check_label

TASKS_DIR = "tasks"
RESULT = "result.json"
RESULT_FORMAT = 1


def _canonical(spec: Mapping[str, Any]) -> Any:
    """The oracle spec as plain JSON values (what a cached task result is compared with)."""
    return json.loads(json.dumps(dict(spec), sort_keys=True, default=str))


# ---------------------------------------------------------------- reading


def _read_systems(path: str | os.PathLike, require_labels: bool = False) -> list[xr.Dataset]:
    """Systems of a frames file with at least one frame ([] for an empty file)."""
    return [ds for ds in read_frames(path, require_labels=require_labels) if nframes(ds)]


# ---------------------------------------------------------------- known labels


def _present_elements(ds: xr.Dataset) -> set[str]:
    tm = type_map_of(ds)
    return {tm[t] for t in np.unique(ds["atom_type"].values)}


def _known_systems(paths: Iterable[str | os.PathLike]) -> list[xr.Dataset]:
    """Labelled systems of the ``known`` files (sorted paths; each must carry energy and force)."""
    out = []
    for p in sorted({os.fspath(p) for p in paths}):
        out.extend(_read_systems(p, require_labels=True))
    return out


def _known_index(known: Sequence[xr.Dataset], ds: xr.Dataset) -> dict[str, tuple[xr.Dataset, int]]:
    """frame id (in ``ds``'s type_map) -> (known system, frame) for known frames of the same system."""
    index: dict[str, tuple[xr.Dataset, int]] = {}
    tm = type_map_of(ds)
    for k in known:
        if k.sizes["atom"] != ds.sizes["atom"] or not _present_elements(k) <= set(tm):
            continue
        k2 = remap_types(k, tm)
        if not np.array_equal(k2["atom_type"].values, ds["atom_type"].values):
            continue
        for f, fid in enumerate(frame_ids(k2)):
            index.setdefault(str(fid), (k, f))
    return index


# ---------------------------------------------------------------- one task


def _read_result(path: Path, spec: Any) -> dict | None:
    """A finished task result made with the same oracle spec, else None (the task must run)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT or record.get("oracle") != spec:
        return None
    if record.get("status") not in ("ok", "failed"):
        return None
    return record


def _spec_tag(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _keep_other_oracle_result(path: Path, spec: Any) -> None:
    """A result made with another oracle spec is set aside as ``result.<spec-hash>.json``, never
    overwritten: switching the oracle back finds it again (see :func:`run_task`)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # unreadable: nothing worth keeping
    if isinstance(old, dict) and old.get("oracle") is not None and old.get("oracle") != spec:
        os.replace(path, path.with_name(f"result.{_spec_tag(old['oracle'])}.json"))


def _set_deaths(marker: Path, n: int) -> None:
    """Record ``n`` unfinished attempts of a task in its ``started`` marker (none: no marker)."""
    if n:
        write_text_atomic(marker, f"{n}\n")
    else:
        marker.unlink(missing_ok=True)


# process deaths (native crash, kill) during one task before it is recorded as failed: one
# death may be a node failure worth retrying; a second is most likely the frame itself
MAX_DEATHS = 2


def run_task(oracle: Oracle, atoms, task_dir: Path, frame_id: str, max_force: float, retry_failed: bool = False, timeout: float | None = None) -> tuple[dict, bool]:
    """Label one frame in ``task_dir`` (or reuse its finished result); returns ``(record, cached)``.

    Any exception from the calculator (``SystemExit`` included), and any label
    :func:`check_label` refuses, gives a record with ``status: failed`` and the reason; errors
    building the calculator are configuration errors and propagate. A ``started`` marker counts
    the attempts that never finished: when the labeler process itself died ``MAX_DEATHS``
    times on this frame (a segfault in native code), the task is recorded as failed instead of
    crashing every rerun. A result of another oracle spec is kept aside, not overwritten.
    ``timeout`` (s): a calculation running longer is stopped, its child processes killed, and
    recorded as failed (see :mod:`.timeout`).
    """
    spec = _canonical(oracle.spec)
    path = task_dir / RESULT
    cached = _read_result(path, spec)
    if cached is None:
        aside = task_dir / f"result.{_spec_tag(spec)}.json"
        cached = _read_result(aside, spec)
        if cached is not None:  # the oracle was switched back: its result becomes current again
            _keep_other_oracle_result(path, spec)
            os.replace(aside, path)
    if cached is not None and not (retry_failed and cached["status"] == "failed"):
        return cached, True
    task_dir.mkdir(parents=True, exist_ok=True)
    _keep_other_oracle_result(path, spec)
    natoms = len(atoms)
    periodic = bool(atoms.pbc.any())
    record: dict[str, Any] = {"format": RESULT_FORMAT, "frame_id": frame_id, "oracle": spec}
    marker = task_dir / "started"
    try:
        deaths = int(marker.read_text().split()[0]) if marker.exists() else 0
    except (OSError, ValueError, IndexError):
        deaths = 1
    t0 = time.perf_counter()
    if deaths >= MAX_DEATHS and not retry_failed:
        reason = f"the labeler process died {deaths} times during this task (a crash in native code, or killed) without a result"
    else:
        _set_deaths(marker, deaths + 1)
        r = None
        try:
            with time_limit(timeout):
                r = oracle.compute(atoms, task_dir)
        except (ConfigError, KeyboardInterrupt):  # not a death of the process in this task: undo the count
            _set_deaths(marker, deaths)
            raise
        except LabelTimeout as exc:  # (the alarm may ring just after the result came: keep it)
            reason = check_label(r, natoms, periodic, max_force) if r is not None else f"timed out: {exc}"
        except (Exception, SystemExit) as exc:
            message = " ".join(str(exc).split())
            reason = f"calculator raised {type(exc).__name__}" + (f": {message[:500]}" if message else "")
            write_text_atomic(task_dir / "error.log", traceback.format_exc())
        else:
            reason = check_label(r, natoms, periodic, max_force)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    if reason:
        record |= {"status": "failed", "reason": reason}
    else:
        stress = r.get("stress")
        record |= {
            "status": "ok",
            "energy": float(r["energy"]),
            "forces": np.asarray(r["forces"], dtype=np.float64).tolist(),
            "stress": None if stress is None or not periodic else np.asarray(stress, dtype=np.float64).tolist(),
            "converged": r.get("converged"),
        }
    write_json_atomic(path, record)
    _set_deaths(marker, 0)
    return record, False


def _virial(stress: Any, cell: np.ndarray) -> np.ndarray:
    """Virial Ξ = -σ·V (eV) from a stress in eV/Å³ (Voigt 6 or 3×3) and the cell (Å)."""
    s = np.asarray(stress, dtype=np.float64)
    s = voigt_6_to_full_3x3_stress(s) if s.shape == (6,) else s.reshape(3, 3)
    return -s * abs(float(np.linalg.det(cell)))


# ---------------------------------------------------------------- the step


def label(
    candidates_path: str | os.PathLike,
    oracle_spec: Mapping[str, Any] | Oracle,
    out_dir: str | os.PathLike,
    max_failed_ratio: float = 0.1,
    known: Iterable[str | os.PathLike] = (),
    max_force: float = MAX_FORCE,
    retry_failed: bool = False,
    log: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> dict:
    """Label the frames of ``candidates_path`` with the oracle; write ``out_dir/{frames.nc, failures.json, summary.json}``.

    Parameters
    ----------
    candidates_path : frames file (e.g. ``select/candidates.nc``); its frames need no labels.
    oracle_spec : ``{"name": ..., "kwargs": {...}}`` (see :mod:`.oracles`) or an :class:`Oracle`.
    out_dir : step directory (created).
    max_failed_ratio : raise :class:`DpeltError` when failed / (unique candidates) exceeds this,
        after ``failures.json``, ``summary.json`` and every finished task result are written.
    known : frames files whose labelled frames are reused instead of computed again.
    max_force : labels with any |F| at or above this (eV/Å) are refused as absurd.
    retry_failed : run again tasks whose earlier result is a failure (default: keep it).
    log : called with one line per task (progress), if given.
    timeout : wall-clock seconds one calculation may take (None: no limit); a longer one is
        stopped, its child processes killed, and the frame recorded as failed ("timed out").

    Returns the summary dictionary (also written to ``summary.json``).
    """
    if not 0.0 <= float(max_failed_ratio) <= 1.0:
        raise ConfigError(f"must lie in [0, 1], got {max_failed_ratio}", key="max_failed_ratio")
    if not float(max_force) > 0:
        raise ConfigError(f"must be > 0 eV/Å, got {max_force}", key="max_force")
    timeout = checked_seconds(timeout, key="timeout")
    candidates_path = Path(candidates_path)
    out_dir = Path(out_dir)
    known = [os.fspath(p) for p in known]
    oracle = oracle_spec if isinstance(oracle_spec, Oracle) else make_oracle(oracle_spec)
    systems = _read_systems(candidates_path)

    # everything that can be refused is refused before the first task runs
    for k, ds in enumerate(systems):
        oracle.check_system(sorted(_present_elements(ds)), ds["pbc"].values.astype(bool), where=f"{candidates_path} (system {k})")
    known_systems = _known_systems(known)

    out_dir.mkdir(parents=True, exist_ok=True)
    frames_path = out_dir / "frames.nc"
    ntotal = sum(nframes(ds) for ds in systems)
    counts = {"total": ntotal, "duplicates": 0, "labelled": 0, "reused": 0, "failed": 0, "computed": 0, "cached": 0}
    failures: list[dict] = []
    warnings: list[str] = []
    labelled_systems: list[xr.Dataset] = []
    seen: set[str] = set()
    done = 0
    for k, ds in enumerate(systems):
        ds = ds.drop_vars([v for v in LABELS if v in ds])
        ids = [str(i) for i in frame_ids(ds)]
        index = _known_index(known_systems, ds) if known_systems else {}
        images = frames_to_atoms(ds)
        cell = ds["cell"].values
        periodic = bool(ds["pbc"].values.any())
        keep: list[int] = []
        energy: list[float] = []
        force: list[np.ndarray] = []
        virial: list[np.ndarray | None] = []
        oracle_of: list[str] = []
        for f, fid in enumerate(ids):
            done += 1
            if fid in seen:
                counts["duplicates"] += 1
                continue
            seen.add(fid)
            hit = index.get(fid)
            if hit is not None:
                kds, kf = hit
                known_oracle = str(kds["oracle"].values[kf])
                if known_oracle in ("", oracle.name):
                    keep.append(f)
                    energy.append(float(kds["energy"].values[kf]))
                    force.append(np.asarray(kds["force"].values[kf], dtype=np.float64))
                    virial.append(np.asarray(kds["virial"].values[kf], dtype=np.float64) if "virial" in kds and periodic else None)
                    oracle_of.append(known_oracle)
                    counts["reused"] += 1
                    if log:
                        log(f"[{done}/{ntotal}] {fid}: reused a known label")
                    continue
            task_dir = out_dir / TASKS_DIR / fid
            record, cached = run_task(oracle, images[f], task_dir, fid, max_force, retry_failed, timeout)
            counts["cached" if cached else "computed"] += 1
            if record["status"] != "ok":
                counts["failed"] += 1
                failures.append(
                    {
                        "frame_id": fid,
                        "source_task": str(ds["source_task"].values[f]),
                        "md_step": int(ds["md_step"].values[f]),
                        "reason": record["reason"],
                        "task_dir": str(Path(TASKS_DIR) / fid),
                    }
                )
                if log:
                    log(f"[{done}/{ntotal}] {fid}: FAILED ({record['reason']})")
                continue
            keep.append(f)
            energy.append(float(record["energy"]))
            force.append(np.asarray(record["forces"], dtype=np.float64))
            virial.append(_virial(record["stress"], cell[f]) if record.get("stress") is not None and periodic else None)
            oracle_of.append(oracle.name)
            counts["labelled"] += 1
            if log:
                log(f"[{done}/{ntotal}] {fid}: {'done earlier' if cached else 'labelled'} ({record.get('seconds', 0):.2f} s)")
        if not keep:
            continue
        out = ds.isel(frame=keep)
        out = out.assign(energy=(("frame",), np.asarray(energy)), force=(("frame", "atom", "xyz"), np.stack(force)))
        if all(v is not None for v in virial):
            out = out.assign(virial=(("frame", "row", "xyz"), np.stack(virial)))
        elif any(v is not None for v in virial):
            warnings.append(f"system {k}: virial dropped (only {sum(v is not None for v in virial)} of {len(virial)} labels carry stress)")
        out = out.assign_coords(oracle=(("frame",), np.asarray(oracle_of, dtype=str)))
        labelled_systems.append(validate_frames(out, str(frames_path), require_labels=True))

    unique = ntotal - counts["duplicates"]
    ratio = counts["failed"] / unique if unique else 0.0
    too_many = ratio > max_failed_ratio
    summary = {
        "oracle": oracle.name,
        "oracle_kwargs": _canonical(oracle.spec).get("kwargs", {}),
        "candidates": str(candidates_path),
        "known": sorted(known),
        **counts,
        "frames": counts["labelled"] + counts["reused"],
        "systems": len(labelled_systems),
        "failed_ratio": ratio,
        "max_failed_ratio": float(max_failed_ratio),
        "max_force": float(max_force),
        "timeout_s": None if timeout is None else float(timeout),
        "status": "too_many_failures" if too_many else "ok",
        "warnings": warnings,
    }
    write_json_atomic(out_dir / "failures.json", failures)
    if too_many:
        if frames_path.exists():
            frames_path.unlink()  # a stale result must not look like this run's
        write_json_atomic(out_dir / "summary.json", summary)
        raise DpeltError(
            f"{counts['failed']} of {unique} labels failed ({ratio:.1%} > max_failed_ratio {max_failed_ratio:g}); "
            f"reasons in {out_dir / 'failures.json'}, finished tasks kept in {out_dir / TASKS_DIR} (a rerun reuses them; "
            "to try the failed ones again: snakemake --retries 1, or dpelt label --retry-failed)",
            path=candidates_path,
            key="max_failed_ratio",
        )
    write_frames(frames_path, labelled_systems)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
