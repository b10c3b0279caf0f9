"""Blow-up detection for exploration MD: the trajectory is cut at the first failed check.

Checked every step: non-finite positions, energy or forces; atoms closer than
``min_distance`` (Å); kinetic temperature above ``max_temperature_factor`` × the target
(runaway); cell volume changed by more than ``max_volume_ratio`` (collapse or explosion);
a cell angle below ``min_cell_angle_deg`` or above 180° minus it (extreme skew). Checked on
kept frames (by the MD driver): the force deviation above ``devi_ceiling`` for
``devi_patience`` frames in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ase
import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class GuardConfig:
    min_distance: float = 0.5
    max_temperature_factor: float = 5.0
    max_volume_ratio: float = 3.0
    min_cell_angle_deg: float = 20.0
    devi_ceiling: Optional[float] = None
    devi_patience: int = 3

    def __post_init__(self) -> None:
        if self.min_distance < 0 or self.max_temperature_factor <= 1 or self.max_volume_ratio <= 1 or not 0 <= self.min_cell_angle_deg < 90:
            raise ConfigError("guards need min_distance >= 0, max_temperature_factor > 1, max_volume_ratio > 1, 0 <= min_cell_angle_deg < 90", key="guards")
        if self.devi_patience < 1:
            raise ConfigError("must be >= 1", key="guards.devi_patience")


def check_step(g: GuardConfig, atoms: ase.Atoms, results: dict, target_T: float, volume0: float | None) -> str:
    """'' when the step is sane, else the reason it is not."""
    if not np.isfinite(atoms.positions).all():
        return "non-finite positions"
    energy = results.get("energy")
    forces = results.get("forces")
    if energy is None or not np.isfinite(energy):
        return f"non-finite energy ({energy})"
    if forces is not None and not np.isfinite(forces).all():
        return "non-finite forces"
    dmin = results.get("min_distance", np.inf)
    if dmin < g.min_distance:
        return f"atoms {dmin:.3f} Å apart (min_distance {g.min_distance} Å)"
    if len(atoms) > 1:
        T = atoms.get_temperature()
        limit = g.max_temperature_factor * max(target_T, 1.0)
        if not np.isfinite(T) or T > limit:
            return f"temperature runaway: {T:.0f} K > {limit:.0f} K"
    if volume0 is not None:
        ratio = atoms.get_volume() / volume0
        if not (1.0 / g.max_volume_ratio < ratio < g.max_volume_ratio):
            return f"cell volume changed by a factor {ratio:.2f}"
        angles = atoms.cell.angles()
        if angles.min() < g.min_cell_angle_deg or angles.max() > 180.0 - g.min_cell_angle_deg:
            return f"extreme cell skew (angles {np.round(angles, 1).tolist()}°)"
    return ""
