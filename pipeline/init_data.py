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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import ase
import ase.io
import numpy as np
import xarray as xr
from ase.build import bulk
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
from .label.oracles import Oracle, label_results, make_oracle
from .label.timeout import LabelTimeout, checked_seconds, running_children, time_limit
from .label.validate import check_label, scf_converged
from .seeds import derive_seed
from .units import fs_to_ase_time

LATTICES = ("fcc", "bcc", "hcp", "diamond", "sc")
_END = object()  # end of an MD generator
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


def _labelled(atoms: ase.Atoms, result: dict, max_force: float) -> tuple[ase.Atoms | None, str]:
    from ase.calculators.singlepoint import SinglePointCalculator

    reason = check_label(result, len(atoms), bool(atoms.pbc.all()), max_force)
    if reason:
        return None, reason
    snap = atoms.copy()
    kw = {"energy": result["energy"], "free_energy": result["energy"], "forces": np.asarray(result["forces"])}
    if result.get("stress") is not None:
        kw["stress"] = np.asarray(result["stress"])
    snap.calc = SinglePointCalculator(snap, **kw)
    return snap, ""


def single_points(images: Sequence[ase.Atoms], oracle: Oracle, workdir: Path, max_force: float, timeout: float | None = None) -> tuple[list[ase.Atoms], list[str]]:
    """Label each image; failed labels are skipped and their reasons returned. A calculation
    running longer than ``timeout`` s (``label.timeout``) is stopped and fails."""
    out, failures = [], []
    for k, atoms in enumerate(images):
        d = workdir / f"sp.{k:05d}"
        d.mkdir(parents=True, exist_ok=True)
        result = None
        try:
            with time_limit(timeout):
                result = oracle.compute(atoms, d)
            lab, reason = _labelled(atoms, result, max_force)
        except DpeltError:
            raise
        except LabelTimeout as exc:  # (the alarm may ring just after the result came: keep it)
            lab, reason = _labelled(atoms, result, max_force) if result is not None else (None, f"timed out: {exc}")
        except Exception as exc:  # a crashed calculation is a failed label, not a failed step
            lab, reason = None, f"{type(exc).__name__}: {exc}"
        if lab is None:
            failures.append(f"{atoms.info.get('source_task', '')} #{k}: {reason}")
        else:
            out.append(lab)
    return out, failures


def oracle_md(
    atoms: ase.Atoms,
    oracle: Oracle,
    md: OracleMDSpec,
    rng: np.random.Generator,
    workdir: Path,
    max_force: float,
    tag: str,
    failures: list[str] | None = None,
    timeout: float | None = None,
) -> list[ase.Atoms]:
    """Langevin MD driven by the oracle (ab initio MD); every ``trj_freq`` steps after
    ``equilibration`` a labelled snapshot is kept. A failed label (crash, SCF not converged,
    non-finite or excessive forces, a step longer than ``timeout`` s) stops the run; its reason
    is appended to ``failures``."""
    if md.nsteps <= 0:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    spare = running_children() if timeout else None  # a hung step also kills what earlier steps started
    a = atoms.copy()
    a.calc = oracle.calculator(workdir)
    thermalize_momenta(a, temperature_K=md.temperature_K, rng=rng)
    Stationary(a)
    dyn = Langevin(a, timestep=fs_to_ase_time(md.dt_fs), temperature_K=md.temperature_K, friction=0.01, fixcm=False, rng=rng)
    kept: list[ase.Atoms] = []
    step, reason = 0, ""
    steps = dyn.irun(steps=md.equilibration + md.nsteps)  # each next(): one oracle calculation
    try:
        while True:
            with time_limit(timeout, spare):
                done = next(steps, _END) is _END
            if done:
                break
            step = dyn.nsteps
            converged = scf_converged(a.calc)
            if converged is False:  # an unconverged SCF drives no further step, kept or not
                reason = "SCF not converged"
                break
            if step <= md.equilibration or (step - md.equilibration) % md.trj_freq:
                continue
            lab, reason = _labelled(a, label_results(a.calc, a), max_force)  # what single points record, the same way
            if lab is None:
                break
            lab.info.update({"md_step": step, "temperature_K": float(md.temperature_K), "source_task": tag})
            kept.append(lab)
    except DpeltError:
        raise
    except LabelTimeout as exc:  # what it labelled before is kept
        reason = f"timed out: {exc}"
    except Exception as exc:  # a crashed calculation ends this MD run; what it labelled is kept
        reason = f"{type(exc).__name__}: {exc}"
    if reason and failures is not None:
        failures.append(f"{tag} step {step}: {reason}; the oracle MD stopped there ({len(kept)} frames kept)")
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


def make_init(spec: InitSpec, oracle_spec: dict, type_map: Sequence[str], out: str | os.PathLike, seed: int, workdir: str | os.PathLike, max_force: float = 50.0, base: Path = Path("."), timeout: float | None = None) -> dict:
    """Build the labelled initial data set into ``out`` (one group per system). ``timeout``:
    wall-clock seconds one oracle calculation may take (``label.timeout``; None: no limit)."""
    out, workdir = Path(out), Path(workdir)
    oracle = make_oracle(oracle_spec)
    timeout = checked_seconds(timeout)  # refused before any oracle work
    images_by_name: dict[str, list[ase.Atoms]] = {}
    failures: list[str] = []
    imported = []  # read first: a bad file is found before any oracle work
    for k, path in enumerate(spec.data):
        p = Path(path) if os.path.isabs(path) else base / path
        if not p.exists():
            raise ConfigError("no such file or directory", path=p, key=f"init.data[{k}]")
        for ds in read_systems(p, type_map=type_map, require_labels=True):
            imported.append(remap_types(ds, type_map).assign_attrs(system=f"{Path(path).name}:{formula(ds)}"))
    for s in spec.structures:  # squeezed structures are refused before any oracle work (own generator: the labelled stream is unchanged)
        probe = build_structure(s, np.random.default_rng(derive_seed(seed, "init", s.name)), base)
        for k, f in enumerate(spec.scale):
            scaled = scaled_copy(probe, f)
            close = neighbor_list("d", scaled, MIN_DISTANCE) if len(scaled) > 1 else []
            if len(close):
                raise ConfigError(
                    f"scale {f:g} puts atoms of {s.name!r} {float(np.min(close)):.3f} Å apart (< {MIN_DISTANCE} Å): no oracle label of that is worth training on",
                    key=f"init.scale[{k}]",
                )
    for s in spec.structures:
        rng = np.random.default_rng(derive_seed(seed, "init", s.name))
        atoms = build_structure(s, rng, base)
        oracle.check_system(atoms.get_chemical_symbols(), atoms.pbc, where=f"init.structures[{s.name}]")
        missing = sorted(set(atoms.get_chemical_symbols()) - set(type_map))
        if missing:
            raise ConfigError(f"structure {s.name!r} has elements {missing} not in type_map {list(type_map)}", key="type_map")
        images: list[ase.Atoms] = []
        for k, f in enumerate(spec.scale):
            scaled = scaled_copy(atoms, f)
            scaled.info["source_task"] = f"init:{s.name}:scale{f:g}"
            todo = [scaled] + perturbed(scaled, spec.perturb, rng)
            labelled, failed = single_points(todo, oracle, workdir / s.name / f"scale{k}", max_force, timeout)
            images += labelled
            failures += failed
            images += oracle_md(scaled, oracle, spec.md, rng, workdir / s.name / f"md{k}", max_force, f"init:{s.name}:md{f:g}", failures, timeout)
        images_by_name[s.name] = images
    systems = _to_systems(images_by_name, type_map, oracle.name, "init")
    systems += imported
    if not systems:
        raise DataError("no labelled initial frame was produced", path=out)
    write_frames(out, systems)
    summary = {
        "systems": [{"system": ds.attrs["system"], "frames": int(ds.sizes["frame"]), "natoms": int(ds.sizes["atom"])} for ds in systems],
        "failures": failures,
        "timeout_s": timeout,
    }
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary


def make_holdout(spec: InitSpec, systems: Sequence[str], temperatures: Sequence[float], frames: int, md: OracleMDSpec, oracle_spec: dict, type_map: Sequence[str], out: str | os.PathLike, seed: int, workdir: str | os.PathLike, max_force: float = 50.0, base: Path = Path("."), timeout: float | None = None) -> dict:
    """Held-out frames: oracle MD from each named structure at each temperature, ``frames`` kept
    each; ``timeout`` as in :func:`make_init`."""
    out, workdir = Path(out), Path(workdir)
    oracle = make_oracle(oracle_spec)
    timeout = checked_seconds(timeout)  # refused before any oracle work
    by_name = {s.name: s for s in spec.structures}
    images_by_name: dict[str, list[ase.Atoms]] = {}
    failures: list[str] = []
    for name in systems:
        if name not in by_name:
            raise ConfigError(f"system {name!r} is not an init structure ({sorted(by_name)})", key="explore.stages.systems")
        rng = np.random.default_rng(derive_seed(seed, "holdout", name))
        atoms = build_structure(by_name[name], rng, base)
        for T in sorted(set(float(t) for t in temperatures)):
            run = OracleMDSpec(temperature_K=T, nsteps=frames * md.trj_freq, trj_freq=md.trj_freq, dt_fs=md.dt_fs, equilibration=md.equilibration)
            kept = oracle_md(atoms, oracle, run, rng, workdir / name / f"T{T:g}", max_force, f"holdout:{name}:T{T:g}", failures, timeout)
            if not kept:  # an empty held-out set would make every later evaluation meaningless
                raise DataError(f"oracle MD for the held-out frames of {name!r} at {T:g} K kept no frame: {failures[-1] if failures else 'no frame reached'}", path=out, key="label.oracle")
            images_by_name.setdefault(name, []).extend(kept)
    systems_out = _to_systems(images_by_name, type_map, oracle.name, "holdout")
    write_frames(out, systems_out)
    summary = {"systems": [{"system": ds.attrs["system"], "frames": int(ds.sizes["frame"])} for ds in systems_out], "temperatures_K": sorted(set(float(t) for t in temperatures)), "failures": failures, "timeout_s": timeout}
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary
