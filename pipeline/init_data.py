"""Initial and held-out data, like DP-GEN's ``init_bulk``.

Initial data: every structure (a generated bulk lattice — a pure element or a random alloy —
or a file ASE reads) is scaled, perturbed (random cell strain and atom displacements,
single-point labels) and run through a short MD with the oracle itself; labelled data in
deepmd/npy, extxyz or NetCDF can be imported besides. Held-out data: oracle MD at every
temperature the exploration will visit, never used by the loop, to judge the final models.

Every system is stored as one group of a frames file with ``attrs["system"]`` = its name,
the name exploration stages refer to.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import ase
import ase.io
import numpy as np
import xarray as xr
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.md.langevin import Langevin
from ase.neighborlist import neighbor_list
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from .config import parse_dataclass
from .data.ase_io import atoms_to_frames
from .data.frames import formula, remap_types
from .data.io import read_systems
from .data.netcdf import write_frames
from .errors import ConfigError, DataError, DpeltError
from .fileio import write_json_atomic
from .label.oracles import OracleSession, make_oracle
from .label.run import failure_entry, run_task
from .label.timeout import checked_seconds
from .seeds import derive_seed
from .units import fs_to_ase_time

LATTICES = ("fcc", "bcc", "hcp", "diamond", "sc")
MIN_DISTANCE = 0.5  # Å: closer atoms in a (scaled) init structure are refused, as explore.guards.min_distance does in MD


@dataclass(frozen=True)
class StructureSpec:
    """A starting structure: a generated lattice or a file. Lengths in Å."""

    name: str
    lattice: Optional[str] = None
    elements: Tuple[str, ...] = ()
    fractions: Optional[Tuple[float, ...]] = None
    a: Optional[float] = None
    c: Optional[float] = None
    repeat: Tuple[int, ...] = (1, 1, 1)
    file: Optional[str] = None

    def check(self, key: str, source: str | None) -> None:
        if (self.file is None) == (self.lattice is None):
            raise ConfigError("give either lattice (with elements) or file", path=source, key=key)
        if self.lattice is not None:
            if self.lattice not in LATTICES:
                raise ConfigError(f"lattice must be one of {LATTICES}, got {self.lattice!r}", path=source, key=f"{key}.lattice")
            if not self.elements:
                raise ConfigError("a generated lattice needs elements", path=source, key=f"{key}.elements")
            if self.fractions is not None and (len(self.fractions) != len(self.elements) or abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) < 0):
                raise ConfigError("fractions: one per element, non-negative, summing to 1", path=source, key=f"{key}.fractions")
        if len(self.repeat) != 3 or min(self.repeat) < 1:
            raise ConfigError(f"repeat must be three positive integers, got {list(self.repeat)}", path=source, key=f"{key}.repeat")


@dataclass(frozen=True)
class PerturbSpec:
    count: int = 0
    cell_strain: float = 0.02
    atom_displacement: float = 0.05


@dataclass(frozen=True)
class OracleMDSpec:
    temperature_K: float = 300.0
    nsteps: int = 0
    trj_freq: int = 10
    dt_fs: float = 2.0
    equilibration: int = 0


@dataclass(frozen=True)
class InitSpec:
    structures: Tuple[StructureSpec, ...] = ()
    scale: Tuple[float, ...] = (1.0,)
    perturb: PerturbSpec = field(default_factory=PerturbSpec)
    md: OracleMDSpec = field(default_factory=OracleMDSpec)
    data: Tuple[str, ...] = ()

    def check(self, key: str, source: str | None) -> None:
        if not self.structures and not self.data:
            raise ConfigError("no structures and no data: nothing to start from", path=source, key=f"{key}.structures")
        names = [s.name for s in self.structures]
        if len(set(names)) != len(names):
            raise ConfigError(f"structure names must be unique, got {names}", path=source, key=f"{key}.structures")
        if any(s <= 0 for s in self.scale):
            raise ConfigError("scale factors must be > 0", path=source, key=f"{key}.scale")


def parse_init_spec(data: dict, source: str | None = None) -> InitSpec:
    return parse_dataclass(InitSpec, data, "init", source)


def build_structure(spec: StructureSpec, rng: np.random.Generator, base: Path = Path(".")) -> ase.Atoms:
    """The structure of ``spec``; a random alloy draws its sites from ``rng``."""
    if spec.file is not None:
        path = Path(spec.file) if os.path.isabs(spec.file) else base / spec.file
        try:
            atoms = ase.io.read(path)
        except Exception as exc:
            raise DataError(f"ASE cannot read this structure: {exc}", path=path) from None
        return atoms.repeat(tuple(spec.repeat))
    kw = {"a": spec.a} if spec.a is not None else {}
    if spec.c is not None:
        kw["c"] = spec.c
    try:
        atoms = bulk(spec.elements[0], spec.lattice, cubic=spec.lattice != "hcp", **kw)
    except Exception as exc:
        raise ConfigError(f"cannot build {spec.lattice} {spec.elements[0]}: {exc}", key=f"init.structures[{spec.name}]") from None
    atoms = atoms.repeat(tuple(spec.repeat))
    if len(spec.elements) > 1:
        n = len(atoms)
        fractions = np.asarray(spec.fractions if spec.fractions is not None else [1 / len(spec.elements)] * len(spec.elements))
        counts = np.floor(fractions * n).astype(int)
        counts[np.argmax(fractions)] += n - counts.sum()
        symbols = np.repeat(list(spec.elements), counts)
        atoms.set_chemical_symbols(rng.permutation(symbols).tolist())
    return atoms


def scaled_copy(atoms: ase.Atoms, factor: float) -> ase.Atoms:
    """A copy with cell and positions scaled by ``factor`` (lengths)."""
    scaled = atoms.copy()
    scaled.set_cell(atoms.cell.array * factor, scale_atoms=True)
    return scaled


def perturbed(atoms: ase.Atoms, spec: PerturbSpec, rng: np.random.Generator) -> list[ase.Atoms]:
    """``count`` copies with a random symmetric cell strain (±cell_strain) and displacements (±atom_displacement Å)."""
    out = []
    for _ in range(spec.count):
        a = atoms.copy()
        if a.pbc.all():
            e = rng.uniform(-spec.cell_strain, spec.cell_strain, (3, 3))
            a.set_cell(a.cell.array @ (np.eye(3) + (e + e.T) / 2), scale_atoms=True)
        a.positions += rng.uniform(-spec.atom_displacement, spec.atom_displacement, a.positions.shape)
        out.append(a)
    return out


class LabelFailed(Exception):
    """An oracle MD step whose label failed (its reason is the message)."""


def atoms_id(atoms: ase.Atoms) -> str:
    """A content id of a structure (numbers, positions, cell, pbc): a finished task result is
    reused only for the very structure it was computed for."""
    h = hashlib.sha256()
    for part in (atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64), atoms.cell.array.astype(np.float64), atoms.pbc.astype(np.int8)):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:16]


def _snapshot(atoms: ase.Atoms, record: dict) -> ase.Atoms:
    """A copy of ``atoms`` carrying the label of an ``ok`` task record."""
    from ase.calculators.singlepoint import SinglePointCalculator

    snap = atoms.copy()
    kw = {"energy": record["energy"], "free_energy": record["energy"], "forces": np.asarray(record["forces"], dtype=np.float64)}
    if record.get("stress") is not None:
        kw["stress"] = np.asarray(record["stress"], dtype=np.float64)
    snap.calc = SinglePointCalculator(snap, **kw)
    return snap


def _failure(record: dict, source_task: str, md_step: int, task_dir: Path) -> dict:
    return failure_entry(record, record.get("frame_id", ""), source_task, md_step, str(task_dir))


def single_points(images: Sequence[ase.Atoms], session: OracleSession, workdir: Path, max_force: float, timeout: float | None = None) -> tuple[list[ase.Atoms], list[dict]]:
    """Label each image through :func:`~pipeline.label.run.run_task` in ``workdir/sp.NNNNN``
    (finished results are reused on a rerun); returns the labelled images and the failure
    records of the others (a calculation longer than ``timeout`` s fails)."""
    out, failures = [], []
    for k, atoms in enumerate(images):
        d = workdir / f"sp.{k:05d}"
        record, _ = run_task(session, atoms, d, atoms_id(atoms), max_force, timeout=timeout)
        if record["status"] == "ok":
            out.append(_snapshot(atoms, record))
        else:
            failures.append(_failure(record, f"{atoms.info.get('source_task', '')} #{k}", -1, d))
    return out, failures


class SessionCalculator(Calculator):
    """An ASE calculator for oracle MD: every calculation is one labeling task
    (:func:`~pipeline.label.run.run_task`, in ``workdir/step.NNNNNN``) of the job's session, so
    MD steps are cached, checked, time-limited and recorded like any label. A failed label
    raises :class:`LabelFailed`. ``record``: the last task record."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, session: OracleSession, workdir: Path, max_force: float, timeout: float | None):
        super().__init__()
        self.session, self.workdir, self.max_force, self.timeout = session, Path(workdir), max_force, timeout
        self.calls = 0
        self.record: dict | None = None
        self.task_dir: Path | None = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        self.task_dir = self.workdir / f"step.{self.calls:06d}"
        self.record, _ = run_task(self.session, self.atoms, self.task_dir, atoms_id(self.atoms), self.max_force, timeout=self.timeout)
        if self.record["status"] != "ok":
            raise LabelFailed(self.record["reason"])
        r = self.record
        self.results = {"energy": r["energy"], "free_energy": r["energy"], "forces": np.asarray(r["forces"], dtype=np.float64)}
        if r.get("stress") is not None:
            self.results["stress"] = np.asarray(r["stress"], dtype=np.float64)


def oracle_md(
    atoms: ase.Atoms,
    session: OracleSession,
    md: OracleMDSpec,
    rng: np.random.Generator,
    workdir: Path,
    max_force: float,
    tag: str,
    failures: list[dict] | None = None,
    timeout: float | None = None,
) -> list[ase.Atoms]:
    """Langevin MD driven by the oracle (ab initio MD); every ``trj_freq`` steps after
    ``equilibration`` a labelled snapshot is kept. Each step is a labeling task of ``session``
    (:class:`SessionCalculator`: a rerun replays finished steps from their results). A failed
    label (crash, SCF not converged, non-finite or excessive forces, a step longer than
    ``timeout`` s) stops the run; its failure record is appended to ``failures``."""
    if md.nsteps <= 0:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    a = atoms.copy()
    calc = a.calc = SessionCalculator(session, workdir, max_force, timeout)
    thermalize_momenta(a, temperature_K=md.temperature_K, rng=rng)
    Stationary(a)
    dyn = Langevin(a, timestep=fs_to_ase_time(md.dt_fs), temperature_K=md.temperature_K, friction=0.01, fixcm=False, rng=rng)
    kept: list[ase.Atoms] = []
    try:
        for _ in dyn.irun(steps=md.equilibration + md.nsteps):  # each step: one oracle label
            step = dyn.nsteps
            if step <= md.equilibration or (step - md.equilibration) % md.trj_freq:
                continue
            lab = _snapshot(a, calc.record)
            lab.info.update({"md_step": step, "temperature_K": float(md.temperature_K), "source_task": tag})
            kept.append(lab)
    except LabelFailed:  # what it labelled before is kept
        if failures is not None:
            record = dict(calc.record, reason=f"{calc.record['reason']}; the oracle MD stopped there ({len(kept)} frames kept)")
            failures.append(_failure(record, tag, calc.calls - 1, calc.task_dir))  # calculation n is MD step n - 1
    return kept


def _to_systems(images_by_name: dict[str, list[ase.Atoms]], type_map: Sequence[str], oracle_name: str, source: str) -> list[xr.Dataset]:
    systems = []
    for name, images in images_by_name.items():
        for img in images:
            img.info.setdefault("source_task", f"init:{name}")
            img.info["oracle"] = oracle_name
        for ds in atoms_to_frames(images, type_map, source=f"{source}:{name}"):
            systems.append(ds.assign_attrs(system=name))
    return systems


def _imported(spec: InitSpec, type_map: Sequence[str], base: Path) -> list[xr.Dataset]:
    """The labelled data files of ``init.data``, read before any oracle work (a bad file is found first)."""
    imported = []
    for k, path in enumerate(spec.data):
        p = Path(path) if os.path.isabs(path) else base / path
        if not p.exists():
            raise ConfigError("no such file or directory", path=p, key=f"init.data[{k}]")
        for ds in read_systems(p, type_map=type_map, require_labels=True):
            imported.append(remap_types(ds, type_map).assign_attrs(system=f"{Path(path).name}:{formula(ds)}"))
    return imported


def _check_structures(spec: InitSpec, oracle, type_map: Sequence[str], seed: int, base: Path) -> None:
    """Refuse, before any oracle work, squeezed scaled structures and elements the oracle or the
    type map does not know (own generators: the labelled stream is unchanged)."""
    for s in spec.structures:
        probe = build_structure(s, np.random.default_rng(derive_seed(seed, "init", s.name)), base)
        oracle.check_system(probe.get_chemical_symbols(), probe.pbc, where=f"init.structures[{s.name}]")
        missing = sorted(set(probe.get_chemical_symbols()) - set(type_map))
        if missing:
            raise ConfigError(f"structure {s.name!r} has elements {missing} not in type_map {list(type_map)}", key="type_map")
        for k, f in enumerate(spec.scale):
            scaled = scaled_copy(probe, f)
            close = neighbor_list("d", scaled, MIN_DISTANCE) if len(scaled) > 1 else []
            if len(close):
                raise ConfigError(
                    f"scale {f:g} puts atoms of {s.name!r} {float(np.min(close)):.3f} Å apart (< {MIN_DISTANCE} Å): no oracle label of that is worth training on",
                    key=f"init.scale[{k}]",
                )


def _write_output(out: Path, systems: list[xr.Dataset], failures: list[dict], summary: dict) -> dict:
    """frames file, ``failures.json`` beside it (as the label step writes), summary ``.json``."""
    write_frames(out, systems)
    write_json_atomic(out.with_name("failures.json"), failures)
    summary["failures"] = failures
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary


def make_init(spec: InitSpec, oracle_spec: dict, type_map: Sequence[str], out: str | os.PathLike, seed: int, workdir: str | os.PathLike, max_force: float = 50.0, base: Path = Path("."), timeout: float | None = None) -> dict:
    """Build the labelled initial data set into ``out`` (one group per system), failure records
    in ``failures.json`` beside it. Every label goes through the label step's own
    :func:`~pipeline.label.run.run_task` in one oracle session (one code server for the job;
    finished tasks under ``workdir`` are reused by a rerun). ``timeout``: wall-clock seconds one
    oracle calculation may take (``label.timeout``; None: no limit)."""
    out, workdir = Path(out), Path(workdir)
    oracle = make_oracle(oracle_spec)
    timeout = checked_seconds(timeout)  # refused before any oracle work
    imported = _imported(spec, type_map, base)
    _check_structures(spec, oracle, type_map, seed, base)
    images_by_name: dict[str, list[ase.Atoms]] = {}
    failures: list[dict] = []
    with oracle.session() as session:
        for s in spec.structures:
            rng = np.random.default_rng(derive_seed(seed, "init", s.name))
            atoms = build_structure(s, rng, base)
            images: list[ase.Atoms] = []
            for k, f in enumerate(spec.scale):
                scaled = scaled_copy(atoms, f)
                scaled.info["source_task"] = f"init:{s.name}:scale{f:g}"
                todo = [scaled] + perturbed(scaled, spec.perturb, rng)
                labelled, failed = single_points(todo, session, workdir / s.name / f"scale{k}", max_force, timeout)
                images += labelled
                failures += failed
                images += oracle_md(scaled, session, spec.md, rng, workdir / s.name / f"md{k}", max_force, f"init:{s.name}:md{f:g}", failures, timeout)
            images_by_name[s.name] = images
    systems = _to_systems(images_by_name, type_map, oracle.name, "init") + imported
    if not systems:
        raise DataError("no labelled initial frame was produced", path=out)
    summary = {"systems": [{"system": ds.attrs["system"], "frames": int(ds.sizes["frame"]), "natoms": int(ds.sizes["atom"])} for ds in systems], "timeout_s": timeout}
    return _write_output(out, systems, failures, summary)


def make_holdout(spec: InitSpec, systems: Sequence[str], temperatures: Sequence[float], frames: int, md: OracleMDSpec, oracle_spec: dict, type_map: Sequence[str], out: str | os.PathLike, seed: int, workdir: str | os.PathLike, max_force: float = 50.0, base: Path = Path("."), timeout: float | None = None) -> dict:
    """Held-out frames: oracle MD from each named structure at each temperature, ``frames`` kept
    each, through one oracle session; ``timeout`` and files as in :func:`make_init`."""
    out, workdir = Path(out), Path(workdir)
    oracle = make_oracle(oracle_spec)
    timeout = checked_seconds(timeout)  # refused before any oracle work
    by_name = {s.name: s for s in spec.structures}
    for name in systems:
        if name not in by_name:
            raise ConfigError(f"system {name!r} is not an init structure ({sorted(by_name)})", key="explore.stages.systems")
    images_by_name: dict[str, list[ase.Atoms]] = {}
    failures: list[dict] = []
    temps = sorted(set(float(t) for t in temperatures))
    with oracle.session() as session:
        for name in systems:
            rng = np.random.default_rng(derive_seed(seed, "holdout", name))
            atoms = build_structure(by_name[name], rng, base)
            oracle.check_system(atoms.get_chemical_symbols(), atoms.pbc, where=f"init.structures[{name}]")
            for T in temps:
                run = OracleMDSpec(temperature_K=T, nsteps=frames * md.trj_freq, trj_freq=md.trj_freq, dt_fs=md.dt_fs, equilibration=md.equilibration)
                kept = oracle_md(atoms, session, run, rng, workdir / name / f"T{T:g}", max_force, f"holdout:{name}:T{T:g}", failures, timeout)
                if not kept:  # an empty held-out set would make every later evaluation meaningless
                    why = f"{failures[-1]['source_task']} step {failures[-1]['md_step']}: {failures[-1]['reason']}" if failures else "no frame reached"
                    raise DataError(f"oracle MD for the held-out frames of {name!r} at {T:g} K kept no frame: {why}", path=out, key="label.oracle")
                images_by_name.setdefault(name, []).extend(kept)
    systems_out = _to_systems(images_by_name, type_map, oracle.name, "holdout")
    summary = {"systems": [{"system": ds.attrs["system"], "frames": int(ds.sizes["frame"])} for ds in systems_out], "temperatures_K": temps, "timeout_s": timeout}
    return _write_output(out, systems_out, failures, summary)
