"""MD integrators split around the force evaluation, for drivers that evaluate many walkers at once.

ASE's integrators call the calculator in the middle of ``step()``, one system at a time. The
batched driver (:mod:`pipeline.explore.batched`) needs the step cut in two: :meth:`begin`
moves the atoms with the forces of the current positions (every walker), one batched
evaluation gives the forces at the new positions, :meth:`end` completes the step.

The arithmetic is ASE's, operation for operation, in float64 numpy on the walker's
``ase.Atoms`` (positions Å, momenta in ASE units, masses amu): the same start, forces and
random stream give the same trajectory bit for bit (tests hold that against ASE).

* :class:`LangevinSteps` — ``ase.md.langevin.Langevin`` with ``fixcm=False``: the
  Vanden-Eijnden–Ciccotti scheme, friction γ = 1/τ_T, two standard normal draws ξ, η of
  shape [natoms, 3] per step from the walker's own generator (ξ first).
* :class:`VerletSteps` — ``ase.md.verlet.VelocityVerlet``.
"""

from __future__ import annotations

import ase
import numpy as np
from ase import units

from ..errors import ConfigError
from ..units import fs_to_ase_time

BATCHED_ENSEMBLES = ("nvt", "nvt-langevin", "nve")


class LangevinSteps:
    """Langevin dynamics at ``temperature_K`` (K) with friction 1/``tau_t_fs``, step ``dt_fs`` (fs)."""

    def __init__(self, atoms: ase.Atoms, dt_fs: float, temperature_K: float, tau_t_fs: float, rng: np.random.Generator):
        self.atoms, self.rng = atoms, rng
        self.dt = dt = fs_to_ase_time(dt_fs)
        fr = 1.0 / fs_to_ase_time(tau_t_fs)
        T = units.kB * temperature_K
        self.masses = masses = atoms.get_masses().reshape(-1, 1)  # [natoms, 1] amu
        sigma = np.sqrt(2 * T * fr / masses)
        self.c1 = dt / 2.0 - dt * dt * fr / 8.0
        self.c2 = dt * fr / 2 - dt * dt * fr * fr / 8.0
        self.c3 = np.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
        self.c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
        self.c4 = fr / 2.0 * self.c5

    def begin(self, forces: np.ndarray) -> None:
        """Half kick with ``forces`` [natoms, 3] (eV/Å) of the current positions, then the drift."""
        atoms = self.atoms
        n = len(atoms)
        v = atoms.get_velocities()
        xi = self.rng.standard_normal(size=(n, 3))
        eta = self.rng.standard_normal(size=(n, 3))
        rnd_pos = self.c5 * eta
        self.rnd_vel = self.c3 * xi - self.c4 * eta
        v += self.c1 * forces / self.masses - self.c2 * v + self.rnd_vel
        x = atoms.get_positions()
        atoms.set_positions(x + self.dt * v + rnd_pos)
        self.v = (atoms.get_positions() - x - rnd_pos) / self.dt

    def end(self, forces: np.ndarray) -> None:
        """Second half kick with the forces [natoms, 3] (eV/Å) at the new positions."""
        self.v += self.c1 * forces / self.masses - self.c2 * self.v + self.rnd_vel
        self.atoms.set_momenta(self.v * self.masses)


class VerletSteps:
    """Velocity Verlet (NVE) with step ``dt_fs`` (fs)."""

    def __init__(self, atoms: ase.Atoms, dt_fs: float):
        self.atoms = atoms
        self.dt = fs_to_ase_time(dt_fs)

    def begin(self, forces: np.ndarray) -> None:
        atoms = self.atoms
        p = atoms.get_momenta()
        p += 0.5 * self.dt * forces
        masses = atoms.get_masses()[:, None]
        r = atoms.get_positions()
        atoms.set_positions(r + self.dt * p / masses)
        atoms.set_momenta(p, apply_constraint=False)

    def end(self, forces: np.ndarray) -> None:
        self.atoms.set_momenta(self.atoms.get_momenta() + 0.5 * self.dt * forces)


def make_steps(task, atoms: ase.Atoms, rng: np.random.Generator):
    """The split integrator of an MDTask's ensemble (nvt/nvt-langevin: Langevin; nve: Verlet)."""
    if task.ensemble in ("nvt", "nvt-langevin"):
        return LangevinSteps(atoms, task.dt_fs, task.temperature_K, task.tau_t_fs, rng)
    if task.ensemble == "nve":
        return VerletSteps(atoms, task.dt_fs)
    raise ConfigError(
        f"the batched exploration runs the ensembles {BATCHED_ENSEMBLES}; task {task.name} asks for {task.ensemble!r}: "
        "set explore.batched: false to run it through ASE",
        key="explore.batched",
    )
