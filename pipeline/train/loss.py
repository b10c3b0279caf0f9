"""DeePMD's energy loss with prefactors that follow the learning rate.

For a batch of frames with N atoms:

    L = p_e · mean(ΔE²)/N + p_f · mean(ΔF²) + p_v · mean(ΔΞ²)/N

with ΔE in eV, ΔF in eV/Å (all 3N components), ΔΞ in eV (9 components), and
p(t) = p_limit + (p_start − p_limit) · lr(t)/start_lr. Reported RMSEs: energy and virial
per atom (eV/atom), force per component (eV/Å).

Loss scale (``loss.normalize_prefactors``, default false = DeePMD-kit's; opt in with true). The prefactors shrink the loss by up
to ~500× over a run (p_f 1000 → 1). Adam divides each step by the root of a running mean of
squared gradients over ~1/(1-β₂) = 1000 steps, so it is blind to the loss scale only while the
scale changes slowly on that window — true of DeePMD-kit's long schedules (10⁶ steps), false of
short ones (a few thousand steps: DP-GEN's retraining, this project's loop, a benchmark), where
the stale, larger squared gradients make Adam's steps shrink much faster than lr (in the water
benchmark's 1500-step schedule, 5× smaller than with the constant scale by step 400, 8–50×
after step 700: bench/adam_lag.py). With ``true`` dpelt minimises L / (p_e + p_f + p_v): the same
relative weights at every step, a scale that stays constant, so Adam's steps follow the
learning rate as configured. Where the
scale changes slowly (long schedules) this changes only how much Adam's ε (10⁻⁸) weighs against
the gradients; ``false`` (the default) gives DeePMD-kit's loss exactly. The opt-in has a cost
in warm starts: with full-size steps in the force-dominated phase the network's mean atomic
energy wanders further (bench/science/energy_warmstart.py; docs/science.md).
The reported ``rmse`` (√L) is DeePMD-kit's, not normalised.
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
    norm: float = 1.0  # the loss is divided by this (see the module docstring)


def prefactors(cfg: LossConfig, lr: float, start_lr: float) -> Prefactors:
    """Prefactors at learning rate ``lr``; ``norm`` is their sum with ``normalize_prefactors``, else 1."""
    ratio = lr / start_lr
    e = cfg.limit_pref_e + (cfg.start_pref_e - cfg.limit_pref_e) * ratio
    f = cfg.limit_pref_f + (cfg.start_pref_f - cfg.limit_pref_f) * ratio
    v = cfg.limit_pref_v + (cfg.start_pref_v - cfg.limit_pref_v) * ratio
    total = e + f + v
    return Prefactors(e=e, f=f, v=v, norm=total if cfg.normalize_prefactors and total > 0 else 1.0)


def energy_loss(pred: dict, energy: torch.Tensor, force: torch.Tensor, virial: torch.Tensor | None, natoms: int, pref: Prefactors) -> tuple[torch.Tensor, dict]:
    """Loss / ``pref.norm`` and RMSEs (as floats, ``rmse`` = √L unnormalised) for one batch. pred from ``DeepPot.forward_rij``."""
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
    return loss / pref.norm if pref.norm != 1.0 else loss, metrics
