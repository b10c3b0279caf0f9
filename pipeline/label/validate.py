"""Checks on one oracle label before it may enter the training data (DESIGN §5).

A label is refused, with a one-line reason, when: the energy is missing, not a scalar or not
finite; the forces are missing, not of shape [natoms, 3] or not finite; the system is periodic
and the stress it carries is not finite or has neither 6 (Voigt) nor 3×3 components; the
largest force norm reaches ``max_force`` (eV/Å; "absurd forces": a broken geometry or a
diverged SCF, never something to learn); or the calculator says its SCF did not converge.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: Default ceiling on |F| of any atom, eV/Å.
MAX_FORCE = 50.0


def _is_false(value: Any) -> bool:
    """True only for an explicit boolean False (a method or None says nothing)."""
    return isinstance(value, (bool, np.bool_)) and not bool(value)


def scf_converged(calc: Any) -> bool | None:
    """Whether the calculator's SCF converged: True, False, or None when it cannot tell.

    Looked at, defensively and in this order: ``results["converged"]``, a boolean
    ``converged`` attribute (PySCFCalculator and calculators following that convention), and
    ``read_convergence()`` where it exists (ASE's Vasp reads OUTCAR); any error while asking
    counts as "cannot tell".
    """
    if calc is None:
        return None
    results = getattr(calc, "results", None)
    if isinstance(results, Mapping) and "converged" in results:
        value = results["converged"]
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    value = getattr(calc, "converged", None)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    reader = getattr(calc, "read_convergence", None)
    if callable(reader):
        try:
            value = reader()
        except Exception:  # no output file, a format this ASE does not know, …
            return None
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    return None


def _results_of(atoms_or_results: Any) -> dict:
    """Energy (eV), forces (eV/Å), stress (eV/Å³) and ``converged`` from an Atoms or a dict."""
    if isinstance(atoms_or_results, Mapping):
        return dict(atoms_or_results)
    calc = getattr(atoms_or_results, "calc", None)
    if calc is None:
        return {}
    results = dict(getattr(calc, "results", {}) or {})
    out = {k: results[k] for k in ("energy", "forces", "stress") if k in results}
    if "free_energy" in results:
        out["energy"] = results["free_energy"]
    out["converged"] = scf_converged(calc)
    return out


def check_label(atoms_or_results: Any, natoms: int, periodic: bool, max_force: float = MAX_FORCE) -> str:
    """Return "" when the label is usable, else the reason it is not.

    ``atoms_or_results`` is an :class:`ase.Atoms` with its calculator attached (results of the
    last calculation are inspected, nothing is computed) or a dict with ``energy`` (eV),
    ``forces`` (eV/Å), optionally ``stress`` (eV/Å³, Voigt 6 or 3×3) and ``converged``.
    """
    r = _results_of(atoms_or_results)
    if _is_false(r.get("converged")):
        return "SCF not converged"
    energy = r.get("energy")
    if energy is None:
        return "no energy"
    try:
        e = np.asarray(energy, dtype=np.float64)
    except (TypeError, ValueError):
        return f"energy is not a number: {energy!r}"
    if e.size != 1:
        return f"energy is not a scalar (shape {e.shape})"
    if not np.isfinite(e).all():
        return f"non-finite energy ({float(e.reshape(()))})"
    forces = r.get("forces")
    if forces is None:
        return "no forces"
    try:
        f = np.asarray(forces, dtype=np.float64)
    except (TypeError, ValueError):
        return "forces are not numbers"
    if f.shape != (natoms, 3):
        return f"forces have shape {f.shape}, expected ({natoms}, 3)"
    if not np.isfinite(f).all():
        atom = int(np.argwhere(~np.isfinite(f))[0][0])
        return f"non-finite force (NaN or inf) on atom {atom}"
    stress = r.get("stress")
    if periodic and stress is not None:
        try:
            s = np.asarray(stress, dtype=np.float64)
        except (TypeError, ValueError):
            return "stress is not numbers"
        if s.shape not in ((6,), (3, 3)):
            return f"stress has shape {s.shape}, expected (6,) or (3, 3)"
        if not np.isfinite(s).all():
            return "non-finite stress (NaN or inf)"
    fmax = float(np.linalg.norm(f, axis=1).max()) if natoms else 0.0
    if fmax >= max_force:
        atom = int(np.argmax(np.linalg.norm(f, axis=1)))
        return f"absurd forces: |F| = {fmax:.4g} eV/Å on atom {atom} (max_force {max_force:g} eV/Å)"
    return ""
