"""Bias potentials that push exploration towards configurations the ensemble does not know.

Both act on the ensemble's per-atom force deviation σ_i = sqrt((1/M) Σ_m |F^m_i − F̄_i|²)
(eV/Å), so their forces need the derivative of the model forces: they are obtained by
autograd through the ensemble evaluated with ``create_graph=True``.

* ``confidence`` (the sampler ELT was designed with): V = α · w(σ_max) · (E_ceil − Ē)₊ with
  w = 1 below ``trust_lo``, 0 above ``trust_hi`` and the C² quintic switch between; Ē the
  ensemble mean energy and E_ceil a ceiling above the thermal energies of the run (the start
  energy plus ``ceiling_kT`` · N k_B T). Where the ensemble is confident the learned surface
  is flattened by the factor (1 − α) and raised towards E_ceil, so MD drifts out of the
  regions already learned; where it is unsure (σ ≥ trust_hi) the bias vanishes and the
  dynamics follows the model alone. α ∈ [0, 1) is the strength.
* ``udd`` (uncertainty-driven dynamics, after Kulichenko et al., Nat. Comput. Sci. 2023, with
  the force variance): V = A · (exp(−⟨σ²⟩ / B²) − 1), ⟨σ²⟩ the mean over atoms of σ_i²; a
  well of depth A (eV) and width B (eV/Å) that pulls towards uncertain configurations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model.env_mat import smooth_switch
from ..units import KB_EV_PER_K

BIAS_KINDS = ("none", "confidence", "udd")


@dataclass(frozen=True)
class BiasConfig:
    """Bias settings. ``strength``: α (confidence, dimensionless) or A (udd, eV)."""

    kind: str = "none"
    strength: float = 0.5
    width: float = 0.1
    trust_lo: float = 0.05
    trust_hi: float = 0.15
    ceiling_kT: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in BIAS_KINDS:
            raise ConfigError(f"bias kind must be one of {BIAS_KINDS}, got {self.kind!r}", key="bias.kind")
        if self.kind == "confidence" and not 0 <= self.strength < 1:
            raise ConfigError(f"confidence bias strength α must lie in [0, 1), got {self.strength}", key="bias.strength")
        if self.kind == "udd" and (self.strength < 0 or self.width <= 0):
            raise ConfigError("udd bias needs strength A >= 0 (eV) and width B > 0 (eV/Å)", key="bias.width")
        if not 0 <= self.trust_lo < self.trust_hi:
            raise ConfigError("need 0 <= trust_lo < trust_hi", key="bias.trust_lo")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.strength > 0


def per_atom_sigma2(forces: torch.Tensor) -> torch.Tensor:
    """forces [M, nloc, 3] -> σ_i² [nloc] (eV²/Å²)."""
    return ((forces - forces.mean(0, keepdim=True)) ** 2).sum(-1).mean(0)


def bias_energy(cfg: BiasConfig, energies: torch.Tensor, forces: torch.Tensor, e_ceiling: torch.Tensor | float) -> torch.Tensor:
    """Bias energy (eV) of one frame from ensemble energies [M] and forces [M, nloc, 3] (with graph)."""
    s2 = per_atom_sigma2(forces)  # [nloc]
    if cfg.kind == "udd":
        return cfg.strength * (torch.exp(-s2.mean() / cfg.width**2) - 1.0)
    sigma_max = torch.sqrt(s2.max() + 1e-30)
    w = smooth_switch(sigma_max, cfg.trust_lo, cfg.trust_hi)
    return cfg.strength * w * torch.relu(e_ceiling - energies.mean())


def energy_ceiling(cfg: BiasConfig, e_start: float, natoms: int, temperature_K: float) -> float:
    """E_ceil = E_start + ceiling_kT · N · k_B · T (eV) for the confidence bias."""
    return e_start + cfg.ceiling_kT * natoms * KB_EV_PER_K * temperature_K
