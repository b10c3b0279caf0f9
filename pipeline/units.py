"""Units: everything inside dpelt is eV, Å, fs, K and bar.

Conversions happen only at the edges (ASE time units, stress in eV/Å³, Hartree/Bohr of
quantum-chemistry codes) and all of them live here.
"""

from __future__ import annotations

import ase.units as _u

#: 1 fs expressed in ASE's internal time unit (Å·sqrt(amu/eV)).
FS_TO_ASE_TIME = _u.fs
#: 1 bar expressed in eV/Å³ (ASE's pressure unit).
BAR_TO_EV_PER_A3 = _u.bar
#: 1 eV/Å³ in bar.
EV_PER_A3_TO_BAR = 1.0 / _u.bar
#: Boltzmann constant in eV/K.
KB_EV_PER_K = _u.kB
#: Hartree in eV and Bohr in Å (for quantum-chemistry oracles).
HARTREE_TO_EV = _u.Hartree
BOHR_TO_A = _u.Bohr


def bar_to_ev_per_a3(p_bar: float) -> float:
    """Pressure in bar -> eV/Å³."""
    return p_bar * BAR_TO_EV_PER_A3


def ev_per_a3_to_bar(p: float) -> float:
    """Pressure in eV/Å³ -> bar."""
    return p * EV_PER_A3_TO_BAR


def fs_to_ase_time(t_fs: float) -> float:
    """Time in fs -> ASE time unit."""
    return t_fs * FS_TO_ASE_TIME
