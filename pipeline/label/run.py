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
from .oracles import Oracle, OracleSession, make_oracle
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


def _cached(task_dir: Path, spec: Any, frame_id: str) -> dict | None:
    """The finished result of this task for ``spec`` and this frame, also one set aside when
    the oracle was switched away and back (it becomes current again)."""
    path = task_dir / RESULT
    cached = _read_result(path, spec)
    if cached is None:
        aside = task_dir / f"result.{_spec_tag(spec)}.json"
        cached = _read_result(aside, spec)
        if cached is not None:
            _keep_other_oracle_result(path, spec)
            os.replace(aside, path)
    if cached is not None and cached.get("frame_id") != frame_id:  # another structure (e.g. an MD step of another run)
        return None
    return cached


def _deaths(marker: Path) -> int:
    try:
        return int(marker.read_text().split()[0]) if marker.exists() else 0
    except (OSError, ValueError, IndexError):
        return 1


def _attempt(session: OracleSession, atoms, task_dir: Path, max_force: float, timeout: float | None) -> tuple[dict | None, str]:
    """One calculation under the time limit: ``(result, reason)``, reason "" for a usable label."""
    natoms, periodic = len(atoms), bool(atoms.pbc.any())
    r = None
    try:
        with time_limit(timeout, session.spare):
            r = session.compute(atoms, task_dir)
    except LabelTimeout as exc:  # (the alarm may ring just after the result came: keep it)
        return r, (check_label(r, natoms, periodic, max_force) if r is not None else f"timed out: {exc}")
    except (ConfigError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:
        message = " ".join(str(exc).split())
        write_text_atomic(task_dir / "error.log", traceback.format_exc())
        return None, f"calculator raised {type(exc).__name__}" + (f": {message[:500]}" if message else "")
    return r, check_label(r, natoms, periodic, max_force)


def _ok_record(r: dict, periodic: bool) -> dict:
    stress = r.get("stress")
    return {
        "status": "ok",
        "energy": float(r["energy"]),
        "forces": np.asarray(r["forces"], dtype=np.float64).tolist(),
        "stress": None if stress is None or not periodic else np.asarray(stress, dtype=np.float64).tolist(),
        "converged": r.get("converged"),
    }


def run_task(session: OracleSession | Oracle, atoms, task_dir: Path, frame_id: str, max_force: float, retry_failed: bool = False, timeout: float | None = None) -> tuple[dict, bool]:
    """Label one frame in ``task_dir`` (or reuse its finished result); returns ``(record, cached)``.

    THE labeling function of the project: the label step, init's single points and the
    init/holdout oracle MD steps all come through here. ``session`` is the job's
    :meth:`Oracle.session` (an :class:`Oracle` gets a session of its own). Any exception from
    the calculator (``SystemExit`` included), and any label :func:`check_label` refuses, gives
    a record with ``status: failed`` and the reason; errors building the calculator are
    configuration errors and propagate. A ``started`` marker counts the attempts that never
    finished: when the labeler process itself died ``MAX_DEATHS`` times on this frame (a
    segfault in native code), the task is recorded as failed instead of crashing every rerun.
    A result of another oracle spec is kept aside, not overwritten. ``timeout`` (s): a
    calculation running longer is stopped, the processes the session started killed, and
    recorded as failed (see :mod:`.timeout`).
    """
    if isinstance(session, Oracle):
        with session.session() as own:
            return run_task(own, atoms, task_dir, frame_id, max_force, retry_failed, timeout)
    spec = _canonical(session.oracle.spec)
    cached = _cached(task_dir, spec, frame_id)
    if cached is not None and not (retry_failed and cached["status"] == "failed"):
        return cached, True
    task_dir.mkdir(parents=True, exist_ok=True)
    _keep_other_oracle_result(task_dir / RESULT, spec)
    record: dict[str, Any] = {"format": RESULT_FORMAT, "frame_id": frame_id, "oracle": spec}
    marker = task_dir / "started"
    deaths = _deaths(marker)
    t0 = time.perf_counter()
    if deaths >= MAX_DEATHS and not retry_failed:
        r, reason = None, f"the labeler process died {deaths} times during this task (a crash in native code, or killed) without a result"
    else:
        _set_deaths(marker, deaths + 1)
        try:
            r, reason = _attempt(session, atoms, task_dir, max_force, timeout)
        except BaseException:  # not a death of the process in this task: undo the count
            _set_deaths(marker, deaths)
            raise
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record |= {"status": "failed", "reason": reason} if reason else _ok_record(r, bool(atoms.pbc.any()))
    write_json_atomic(task_dir / RESULT, record)
    _set_deaths(marker, 0)
    return record, False


def _virial(stress: Any, cell: np.ndarray) -> np.ndarray:
    """Virial Ξ = -σ·V (eV) from a stress in eV/Å³ (Voigt 6 or 3×3) and the cell (Å)."""
    s = np.asarray(stress, dtype=np.float64)
    s = voigt_6_to_full_3x3_stress(s) if s.shape == (6,) else s.reshape(3, 3)
    return -s * abs(float(np.linalg.det(cell)))


# ---------------------------------------------------------------- the step


def _check_step_args(max_failed_ratio: float, max_force: float, timeout: float | None) -> float | None:
    if not 0.0 <= float(max_failed_ratio) <= 1.0:
        raise ConfigError(f"must lie in [0, 1], got {max_failed_ratio}", key="max_failed_ratio")
    if not float(max_force) > 0:
        raise ConfigError(f"must be > 0 eV/Å, got {max_force}", key="max_force")
    return checked_seconds(timeout, key="timeout")


class _Tally:
    """Counts, failure records and warnings of one label step."""

    def __init__(self, ntotal: int, log: Callable[[str], None] | None):
        self.counts = {"total": ntotal, "duplicates": 0, "labelled": 0, "reused": 0, "failed": 0, "computed": 0, "cached": 0}
        self.failures: list[dict] = []
        self.warnings: list[str] = []
        self.seen: set[str] = set()
        self.done = 0
        self.log = log

    def say(self, fid: str, what: str) -> None:
        if self.log:
            self.log(f"[{self.done}/{self.counts['total']}] {fid}: {what}")


class _Labels:
    """The labels of one system's kept frames, in frame order."""

    def __init__(self):
        self.keep: list[int] = []
        self.energy: list[float] = []
        self.force: list[np.ndarray] = []
        self.virial: list[np.ndarray | None] = []
        self.oracle: list[str] = []

    def add(self, f: int, energy: float, force: Any, virial: Any, oracle: str) -> None:
        self.keep.append(f)
        self.energy.append(float(energy))
        self.force.append(np.asarray(force, dtype=np.float64))
        self.virial.append(virial)
        self.oracle.append(oracle)


def _reuse_known(hit: tuple[xr.Dataset, int] | None, oracle_name: str, periodic: bool, f: int, labels: _Labels) -> bool:
    """Take a known label of the same frame (same oracle, or none recorded); True when taken."""
    if hit is None:
        return False
    kds, kf = hit
    known_oracle = str(kds["oracle"].values[kf])
    if known_oracle not in ("", oracle_name):
        return False
    virial = np.asarray(kds["virial"].values[kf], dtype=np.float64) if "virial" in kds and periodic else None
    labels.add(f, kds["energy"].values[kf], kds["force"].values[kf], virial, known_oracle)
    return True


def _label_system(session: OracleSession, ds: xr.Dataset, known_systems: list[xr.Dataset], out_dir: Path, tally: _Tally, opts: dict) -> _Labels:
    """Label (or reuse, or take from finished tasks) every new frame of one system."""
    ids = [str(i) for i in frame_ids(ds)]
    index = _known_index(known_systems, ds) if known_systems else {}
    images = frames_to_atoms(ds)
    cell = ds["cell"].values
    periodic = bool(ds["pbc"].values.any())
    labels = _Labels()
    for f, fid in enumerate(ids):
        tally.done += 1
        if fid in tally.seen:
            tally.counts["duplicates"] += 1
            continue
        tally.seen.add(fid)
        if _reuse_known(index.get(fid), session.oracle.name, periodic, f, labels):
            tally.counts["reused"] += 1
            tally.say(fid, "reused a known label")
            continue
        record, cached = run_task(session, images[f], out_dir / TASKS_DIR / fid, fid, **opts)
        tally.counts["cached" if cached else "computed"] += 1
        if record["status"] != "ok":
            tally.counts["failed"] += 1
            tally.failures.append(failure_entry(record, fid, str(ds["source_task"].values[f]), int(ds["md_step"].values[f]), str(Path(TASKS_DIR) / fid)))
            tally.say(fid, f"FAILED ({record['reason']})")
            continue
        virial = _virial(record["stress"], cell[f]) if record.get("stress") is not None and periodic else None
        labels.add(f, record["energy"], record["forces"], virial, session.oracle.name)
        tally.counts["labelled"] += 1
        tally.say(fid, f"{'done earlier' if cached else 'labelled'} ({record.get('seconds', 0):.2f} s)")
    return labels


def failure_entry(record: dict, frame_id: str, source_task: str, md_step: int, task_dir: str) -> dict:
    """One quarantined frame as ``failures.json`` lists it."""
    return {"frame_id": frame_id, "source_task": source_task, "md_step": md_step, "reason": record["reason"], "task_dir": task_dir}


def _labelled_dataset(ds: xr.Dataset, labels: _Labels, k: int, tally: _Tally, frames_path: Path) -> xr.Dataset:
    out = ds.isel(frame=labels.keep)
    out = out.assign(energy=(("frame",), np.asarray(labels.energy)), force=(("frame", "atom", "xyz"), np.stack(labels.force)))
    if all(v is not None for v in labels.virial):
        out = out.assign(virial=(("frame", "row", "xyz"), np.stack(labels.virial)))
    elif any(v is not None for v in labels.virial):
        tally.warnings.append(f"system {k}: virial dropped (only {sum(v is not None for v in labels.virial)} of {len(labels.virial)} labels carry stress)")
    out = out.assign_coords(oracle=(("frame",), np.asarray(labels.oracle, dtype=str)))
    return validate_frames(out, str(frames_path), require_labels=True)


def _write_outcome(out_dir: Path, candidates_path: Path, summary: dict, tally: _Tally, labelled_systems: list[xr.Dataset]) -> None:
    """failures.json, then frames.nc (unless too many failed: raise) and summary.json."""
    frames_path = out_dir / "frames.nc"
    write_json_atomic(out_dir / "failures.json", tally.failures)
    if summary["status"] == "too_many_failures":
        if frames_path.exists():
            frames_path.unlink()  # a stale result must not look like this run's
        write_json_atomic(out_dir / "summary.json", summary)
        c, ratio = summary, summary["failed_ratio"]
        raise DpeltError(
            f"{c['failed']} of {c['total'] - c['duplicates']} labels failed ({ratio:.1%} > max_failed_ratio {c['max_failed_ratio']:g}); "
            f"reasons in {out_dir / 'failures.json'}, finished tasks kept in {out_dir / TASKS_DIR} (a rerun reuses them; "
            "to try the failed ones again: snakemake --retries 1, or dpelt label --retry-failed)",
            path=candidates_path,
            key="max_failed_ratio",
        )
    write_frames(frames_path, labelled_systems)
    write_json_atomic(out_dir / "summary.json", summary)


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
    timeout = _check_step_args(max_failed_ratio, max_force, timeout)
    candidates_path, out_dir = Path(candidates_path), Path(out_dir)
    known = [os.fspath(p) for p in known]
    oracle = oracle_spec if isinstance(oracle_spec, Oracle) else make_oracle(oracle_spec)
    systems = _read_systems(candidates_path)
    for k, ds in enumerate(systems):  # everything that can be refused is refused before the first task runs
        oracle.check_system(sorted(_present_elements(ds)), ds["pbc"].values.astype(bool), where=f"{candidates_path} (system {k})")
    known_systems = _known_systems(known)
    out_dir.mkdir(parents=True, exist_ok=True)
    tally = _Tally(sum(nframes(ds) for ds in systems), log)
    opts = {"max_force": max_force, "retry_failed": retry_failed, "timeout": timeout}
    labelled_systems = []
    with oracle.session() as session:  # one code server (cp2k_shell) for the whole step
        for k, ds in enumerate(systems):
            labels = _label_system(session, ds.drop_vars([v for v in LABELS if v in ds]), known_systems, out_dir, tally, opts)
            if labels.keep:
                labelled_systems.append(_labelled_dataset(ds.drop_vars([v for v in LABELS if v in ds]), labels, k, tally, out_dir / "frames.nc"))
    c = tally.counts
    unique = c["total"] - c["duplicates"]
    ratio = c["failed"] / unique if unique else 0.0
    summary = {
        "oracle": oracle.name,
        "oracle_kwargs": _canonical(oracle.spec).get("kwargs", {}),
        "candidates": str(candidates_path),
        "known": sorted(known),
        **c,
        "frames": c["labelled"] + c["reused"],
        "systems": len(labelled_systems),
        "failed_ratio": ratio,
        "max_failed_ratio": float(max_failed_ratio),
        "max_force": float(max_force),
        "timeout_s": None if timeout is None else float(timeout),
        "status": "too_many_failures" if ratio > max_failed_ratio else "ok",
        "warnings": tally.warnings,
    }
    _write_outcome(out_dir, candidates_path, summary, tally, labelled_systems)
    return summary
