"""All exploration walkers of an iteration in one process: one batched evaluation per MD step.

The loop's systems are small (32 atoms, tiny nets), so an MD step through ASE costs mostly
per-operation overhead — Python dispatch, autograd bookkeeping, ASE's calculator plumbing —
paid once per task and per member. Here the W walkers (tasks) of an iteration advance in
lockstep: every step, each walker's neighbour list is built as today and the W frames are
concatenated into one "super-frame" (atoms of walker w at rows off_w … off_w + n_w, their
neighbour indices shifted by off_w), which the model evaluates in one pass. Walkers never see
each other: neighbour lists are per walker, so the super-frame is block-diagonal.

Per step, as :class:`pipeline.calculator.EnsembleCalculator` does for one task: with
``drive: first``, no bias and no deviation due, model 0 alone (``DeepPot.forward_rij``);
otherwise every member on per-member copies of the displacements (stacked when the members
share their shapes), giving per walker the members' energies [M] (eV), forces [M, n_w, 3]
(eV/Å) and virials [M, 3, 3] (eV, from that walker's rows of ∂E/∂rij), DP-GEN's deviations,
and the optional bias (one autograd pass for the sum of the walkers' bias energies: each
walker's bias depends on its own rows only).

The integrators are ASE's, cut around the evaluation (:mod:`.integrators`); each walker keeps
the random generator seeded by its task seed (derived from the run seed and the task name),
so its noise does not depend on the other walkers. With one walker the trajectory is ASE's
bit for bit; in a batch the model's section counts (the largest neighbour count of any atom)
may grow, which changes rounding only (tests: alone vs in a batch within 1e-9 Å).
Frames and deviations are kept and written per task by :class:`.record.TaskRecorder`, the
same files as the per-task driver.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import ase
import numpy as np
import torch
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from ..calculator import atom_types
from ..model.deeppot import scatter_forces, virial_from_grad
from ..model.ensemble import Ensemble
from ..model.neighbor import build_neighbor_list
from .bias import bias_energy, energy_ceiling
from .deviation import model_deviation
from .integrators import make_steps
from .record import TaskRecorder

log = logging.getLogger(__name__)


@dataclass
class Walker:
    """One task's MD state: its atoms (positions, momenta), integrator, recorder."""

    task: object  # MDTask
    atoms: ase.Atoms
    atype: np.ndarray  # [n] type indices
    steps: object  # LangevinSteps | VerletSteps
    record: TaskRecorder
    out_dir: str
    source: str = ""
    bias_ceiling: Optional[float] = None
    deviation_due: bool = True
    results: dict = field(default_factory=dict)


def super_frame(walkers: Sequence[Walker], rcut: float, sel: Sequence[int]):
    """Neighbour lists of the walkers, concatenated: rij [1, N, nnei, 3] Å, nlist, partner
    [1, N, nnei] (indices into the N = Σ n_w rows), atype [N], row offsets [W + 1], the
    largest overflow per walker and the closest pair per walker (Å)."""
    rijs, nlists, partners, offsets, overflow, dmin = [], [], [], [0], [], []
    nnei = int(sum(sel))
    for w in walkers:
        nl = build_neighbor_list(w.atoms.positions, w.atoms.cell.array, w.atoms.pbc, w.atype, rcut, sel)
        off = offsets[-1]
        rijs.append(nl.rij)
        nlists.append(np.where(nl.nlist >= 0, nl.nlist + off, -1))
        partners.append(np.where(nl.partner >= 0, nl.partner + off * nnei, -1))
        offsets.append(off + len(w.atype))
        overflow.append(nl.max_overflow)
        real = nl.nlist >= 0
        dmin.append(float(np.sqrt((nl.rij[real] ** 2).sum(-1)).min()) if real.any() else float("inf"))
    rij = torch.from_numpy(np.concatenate(rijs))[None]
    nlist = torch.from_numpy(np.concatenate(nlists))[None]
    partner = torch.from_numpy(np.concatenate(partners))[None]
    atype = torch.from_numpy(np.concatenate([w.atype for w in walkers]))
    return rij, nlist, partner, atype, offsets, overflow, dmin


def members_pass(ensemble: Ensemble, rij: torch.Tensor, nlist: torch.Tensor, atype: torch.Tensor, create_graph: bool):
    """Every member on its own copy of rij [1, N, nnei, 3]: atomic energies [M, 1, N] (eV),
    g = ∂E_m/∂rij [M, 1, N, nnei, 3] and the per-member leaf rij_m (as Ensemble.evaluate,
    which returns no g: the walkers' virials need their own rows of it)."""
    M = len(ensemble)
    counts = ensemble.models[0].section_counts(nlist)
    rij_m = rij.detach().to(torch.float64).unsqueeze(0).repeat(M, 1, 1, 1, 1).requires_grad_(True)  # [M, 1, N, nnei, 3]
    if ensemble.stack is not None:
        atom_energy = ensemble.stack.atomic_energy(rij_m, atype, counts)  # [M, 1, N]
    else:
        atom_energy = torch.stack([m.atomic_energy(rij_m[k], atype, counts) for k, m in enumerate(ensemble.models)])
    (g,) = torch.autograd.grad([atom_energy.sum()], [rij_m], create_graph=create_graph, allow_unused=True)
    return atom_energy, (torch.zeros_like(rij_m) if g is None else g), rij_m


class BatchEvaluator:
    """Energies, forces and (when due) deviations of many walkers in one model pass."""

    def __init__(self, ensemble: Ensemble, drive: str = "first", bias=None):
        self.ensemble = ensemble
        self.drive = drive
        self.bias = bias if bias is not None and bias.active else None
        self.overflow_frames = 0

    def __call__(self, walkers: Sequence[Walker]) -> None:
        """Fill ``w.results`` of every walker for its current positions (keys of EnsembleCalculator).

        Walkers with the same set of elements share a super-frame: the model computes, for
        every atom of a super-frame, as many slots per neighbour type as the fullest atom has,
        so a copper walker beside a gold one would carry ~50 empty gold slots per atom through
        the embedding nets (measured: the full ensemble pass of 2 Cu + 2 Au walkers costs
        ~1.6× that of 4 Cu walkers)."""
        groups: dict[tuple, list[Walker]] = {}
        for w in walkers:
            groups.setdefault(tuple(np.unique(w.atype)), []).append(w)
        for group in groups.values():
            self._evaluate(group)

    def _evaluate(self, walkers: Sequence[Walker]) -> None:
        ens = self.ensemble
        rij, nlist, partner, atype, off, overflow, dmin = super_frame(walkers, ens.rcut, ens.sel)
        for w, o, d in zip(walkers, overflow, dmin):
            if o:
                if self.overflow_frames == 0:
                    warnings.warn(f"an atom has more neighbours than sel allows ({o} beyond sel); the nearest are kept", stacklevel=2)
                self.overflow_frames += 1
            w.results = {"min_distance": d, "bias_energy": 0.0, "deviation": None}
        full = self.bias is not None or self.drive == "mean" or any(w.deviation_due for w in walkers)
        if not full:
            out = ens.models[0].forward_rij(rij, nlist, atype, True, False, False, partner)
            for k, w in enumerate(walkers):
                a, b = off[k], off[k + 1]
                w.results["energy"] = float(out["atom_energy"][0, a:b].sum().detach())
                w.results["forces"] = out["force"][0, a:b].detach().numpy().copy()
            return
        self._full(walkers, rij, nlist, atype, off)

    def _full(self, walkers, rij, nlist, atype, off) -> None:
        atom_energy, g, rij_m = members_pass(self.ensemble, rij, nlist, atype, self.bias is not None)
        force = scatter_forces(g, nlist)  # [M, 1, N, 3]
        pick = (lambda x: x.mean(0)) if self.drive == "mean" else (lambda x: x[0])
        vbias = []
        for k, w in enumerate(walkers):
            a, b = off[k], off[k + 1]
            E, F = atom_energy[:, 0, a:b].sum(-1), force[:, 0, a:b]  # [M], [M, n, 3]
            periodic = bool(w.atoms.pbc.all())
            V = -virial_from_grad(g[:, :, a:b], rij_m[:, :, a:b]).detach().numpy() if periodic else None  # [M, 1, 3, 3]
            Ed, Fd = E.detach().numpy(), F.detach().numpy()
            dev = model_deviation(Ed[:, None], Fd[:, None], V)
            w.results.update(energy=float(pick(E).detach()), forces=pick(F).detach().numpy().copy(), mean_energy=float(E.mean().detach()))
            w.results["deviation"] = {key: float(v[0]) for key, v in dev.items()}
            if self.bias is not None:
                ceiling = w.bias_ceiling if w.bias_ceiling is not None else float(E.mean().detach())
                vbias.append(bias_energy(w.task.bias, E, F, ceiling))
        if vbias:
            (gb,) = torch.autograd.grad([torch.stack(vbias).sum()], [rij_m], allow_unused=True)
            if gb is not None:
                fb = scatter_forces(gb.sum(0).unsqueeze(0), nlist)[0, 0].detach().numpy()  # [N, 3]
                for k, w in enumerate(walkers):
                    w.results["forces"] = w.results["forces"] + fb[off[k] : off[k + 1]]
            for w, v in zip(walkers, vbias):
                w.results["energy"] += float(v.detach())
                w.results["bias_energy"] = float(v.detach())


def start_walker(task, atoms: ase.Atoms, type_map: Sequence[str], out_dir: str | os.PathLike, source: str = "", model_path: str | None = None) -> Walker:
    """A walker at ``atoms`` with momenta drawn as the per-task driver does (same generator)."""
    atoms = atoms.copy()
    atoms.calc = None
    rng = np.random.default_rng(task.seed)
    thermalize_momenta(atoms, temperature_K=task.temperature_K, rng=rng)
    Stationary(atoms)
    atype = atom_types(atoms.get_chemical_symbols(), type_map, model_path)
    return Walker(task, atoms, atype, make_steps(task, atoms, rng), TaskRecorder(task, atoms), os.fspath(out_dir), source)


def _observe(w: Walker, step: int) -> bool:
    """Book-keeping after step ``step`` of walker ``w``; True when the walker goes on."""
    task = w.task
    if step == 0 and task.bias.active and w.bias_ceiling is None:
        w.bias_ceiling = energy_ceiling(task.bias, w.results["mean_energy"], len(w.atoms), task.temperature_K)
    if w.record.observe(step, w.atoms, w.results):
        return False
    w.deviation_due = (step + 1) % task.trj_freq == 0
    return step < task.nsteps


def run_walkers(walkers: Sequence[Walker], evaluator: BatchEvaluator, type_map: Sequence[str]) -> list[dict]:
    """Advance every walker to its ``nsteps`` (or its first failed check) in lockstep; write
    each task's files as it ends. Returns the task summaries in the walkers' order."""
    summaries: dict[int, dict] = {}
    evaluator(walkers)
    active, step = list(walkers), 0
    while True:
        going = []
        for w in active:
            if _observe(w, step):
                going.append(w)
            else:
                summaries[id(w)] = w.record.finish(w.out_dir, w.atoms, type_map, w.source)
        active = going
        if not active:
            break
        for w in active:
            w.steps.begin(w.results["forces"])
        evaluator(active)
        for w in active:
            w.steps.end(w.results["forces"])
        step += 1
    return [summaries[id(w)] for w in walkers]


def explore_batch(tasks: Sequence, starts: Sequence[ase.Atoms], models: Sequence, out_dirs: Sequence, sources: Sequence[str] | None = None, threads: int | None = None) -> list[dict]:
    """Run the MDTasks ``tasks`` from ``starts`` in one process with the ensemble ``models``
    (files or loaded DeepPot); task k writes frames.nc, md.json, md.log into ``out_dirs[k]``.

    The tasks share the drive and whether a bias is on (an iteration's tasks do: both come
    from the run's explore section). Returns the task summaries.
    """
    from ..errors import ConfigError
    from ..model.serialize import load_model
    from ..runtime import configure_torch

    if not tasks:
        return []
    configure_torch(threads)
    if len({t.drive for t in tasks}) > 1 or len({t.bias.active for t in tasks}) > 1:
        raise ConfigError("the tasks of one batch must share explore.drive and whether explore.bias is on", key="explore.batched")
    paths = [os.fspath(m) if isinstance(m, (str, os.PathLike)) else None for m in models]
    loaded = [load_model(m).requires_grad_(False) if isinstance(m, (str, os.PathLike)) else m.eval() for m in models]
    ens = Ensemble(loaded, paths)
    sources = list(sources) if sources is not None else [""] * len(tasks)
    walkers = [start_walker(t, a, ens.type_map, d, s, paths[0]) for t, a, d, s in zip(tasks, starts, out_dirs, sources)]
    log.info("batched exploration: %d walkers × %d members in one process", len(walkers), len(ens))
    return run_walkers(walkers, BatchEvaluator(ens, tasks[0].drive, tasks[0].bias), ens.type_map)
