"""DeePMD's energy loss with prefactors that follow the learning rate.

For a batch of frames with N atoms:

    L = p_e · mean(ΔE²)/N + p_f · mean(ΔF²) + p_v · mean(ΔΞ²)/N

with ΔE in eV, ΔF in eV/Å (all 3N components), ΔΞ in eV (9 components), and
p(t) = p_limit + (p_start − p_limit) · lr(t)/start_lr. Reported RMSEs: energy and virial
per atom (eV/atom), force per component (eV/Å).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LossConfig


@dataclass(frozen=True)
class Prefactors:
    e: float
    f: float
    v: float


def prefactors(cfg: LossConfig, lr: float, start_lr: float) -> Prefactors:
    ratio = lr / start_lr
    return Prefactors(
        e=cfg.limit_pref_e + (cfg.start_pref_e - cfg.limit_pref_e) * ratio,
        f=cfg.limit_pref_f + (cfg.start_pref_f - cfg.limit_pref_f) * ratio,
        v=cfg.limit_pref_v + (cfg.start_pref_v - cfg.limit_pref_v) * ratio,
    )


def energy_loss(pred: dict, energy: torch.Tensor, force: torch.Tensor, virial: torch.Tensor | None, natoms: int, pref: Prefactors) -> tuple[torch.Tensor, dict]:
    """Loss and RMSEs (as floats) for one batch. pred from ``DeepPot.forward_rij``."""
    de2 = torch.mean((pred["energy"] - energy) ** 2)  # eV²
    df2 = torch.mean((pred["force"] - force) ** 2)  # (eV/Å)²
    loss = pref.e * de2 / natoms + pref.f * df2
    metrics = {"rmse_e": de2.detach().sqrt().item() / natoms, "rmse_f": df2.detach().sqrt().item()}
    if virial is not None and "virial" in pred:
        dv2 = torch.mean((pred["virial"] - virial) ** 2)
        if pref.v > 0:
            loss = loss + pref.v * dv2 / natoms
        metrics["rmse_v"] = dv2.detach().sqrt().item() / natoms
    metrics["rmse"] = loss.detach().sqrt().item()
    return loss, metrics
