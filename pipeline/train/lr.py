"""Exponentially decaying learning rate (DeePMD-kit's ``exp`` schedule).

lr(t) = start_lr · r^floor(t / decay_steps) with r = (stop_lr/start_lr)^(decay_steps/numb_steps),
so that lr reaches stop_lr at the last step. A ``decay_steps`` not below ``numb_steps``
would never decay; it is then shortened (to 1/100 of the run, at least 1 step).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LearningRateConfig


@dataclass(frozen=True)
class ExpDecay:
    start_lr: float
    stop_lr: float
    decay_steps: int
    decay_rate: float

    @classmethod
    def from_config(cls, cfg: LearningRateConfig, numb_steps: int) -> "ExpDecay":
        decay_steps = cfg.decay_steps
        if numb_steps > 0 and decay_steps >= numb_steps:
            decay_steps = max(1, numb_steps // 100)
        if cfg.decay_rate is not None:
            rate = cfg.decay_rate
        elif numb_steps > 0:
            rate = (cfg.stop_lr / cfg.start_lr) ** (decay_steps / numb_steps)
        else:
            rate = 1.0
        return cls(cfg.start_lr, cfg.stop_lr, decay_steps, rate)

    def __call__(self, step: int) -> float:
        """Learning rate used for training step ``step`` (0-based)."""
        return self.start_lr * self.decay_rate ** (step // self.decay_steps)
