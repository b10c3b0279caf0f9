"""Model deviation of an ensemble (DP-GEN / DeePMD-kit ``model_devi`` definitions).

For M models predicting forces F^m_i (eV/Å), energies E^m (eV) and virials Ξ^m (eV) on a
frame with N atoms:

* per-atom force deviation  σ_i = sqrt( (1/M) Σ_m |F^m_i − F̄_i|² )   (eV/Å)
  ``max_devi_f``, ``min_devi_f``, ``avg_devi_f`` = max, min, mean of σ_i over atoms;
* ``devi_e`` = standard deviation over models of E^m / N   (eV/atom);
* virial: standard deviation over models of each of the 9 components of Ξ^m / N (eV/atom);
  ``max_devi_v``, ``min_devi_v`` = max, min over components, ``avg_devi_v`` = their norm / 3.
"""

from __future__ import annotations

import numpy as np

DEVIATION_KEYS = ("max_devi_f", "min_devi_f", "avg_devi_f", "devi_e", "max_devi_v", "min_devi_v", "avg_devi_v")


def force_deviation(forces: np.ndarray) -> np.ndarray:
    """forces [M, nframes, natoms, 3] -> per-atom σ_i [nframes, natoms] (eV/Å)."""
    mean = forces.mean(axis=0, keepdims=True)
    return np.sqrt(np.mean(np.sum((forces - mean) ** 2, axis=-1), axis=0))


def model_deviation(energies: np.ndarray, forces: np.ndarray, virials: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """energies [M, nf] eV, forces [M, nf, natoms, 3] eV/Å, virials [M, nf, 3, 3] eV -> per-frame deviations."""
    natoms = forces.shape[2]
    sigma = force_deviation(forces)  # [nf, natoms]
    out = {
        "max_devi_f": sigma.max(axis=1),
        "min_devi_f": sigma.min(axis=1),
        "avg_devi_f": sigma.mean(axis=1),
        "devi_e": np.std(energies / natoms, axis=0),
    }
    nf = forces.shape[1]
    if virials is not None:
        sv = np.std(virials.reshape(virials.shape[0], nf, 9) / natoms, axis=0)  # [nf, 9]
        out.update({"max_devi_v": sv.max(axis=1), "min_devi_v": sv.min(axis=1), "avg_devi_v": np.linalg.norm(sv, axis=1) / 3.0})
    else:
        out.update({k: np.full(nf, np.nan) for k in ("max_devi_v", "min_devi_v", "avg_devi_v")})
    return out
