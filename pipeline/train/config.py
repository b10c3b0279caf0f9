"""Training configuration: DeePMD-kit's ``input.json`` sections (model, learning_rate, loss,
training), read from dpelt YAML or from a DeePMD-kit JSON file as is.

dpelt additions (optional): ``training.threads`` (torch intra-op threads; fixed so results
are bit-identical), ``training.validation_data.frames`` (how many fixed frames to validate on)
and ``loss.normalize_prefactors`` (default false: DeePMD-kit's loss scale, so a DeePMD-kit input
trains with DeePMD-kit's semantics; true opts in to the normalised loss, see
:mod:`pipeline.train.loss`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Tuple, Union

from ..config import load_mapping, parse_dataclass, unsupported
from ..errors import ConfigError
from ..model.config import ModelConfig


@dataclass(frozen=True)
class LearningRateConfig:
    """Exponential decay: lr(t) = start_lr · r^floor(t / decay_steps), r chosen so lr(numb_steps) = stop_lr."""

    type: str = "exp"
    start_lr: float = 1e-3
    stop_lr: float = 1e-8
    decay_steps: int = 5000
    decay_rate: Optional[float] = None
    scale_by_worker: str = unsupported("linear")
    warmup_steps: int = unsupported(0)

    def check(self, key: str, source: str | None) -> None:
        if self.type != "exp":
            raise ConfigError(f"learning-rate type {self.type!r} is not supported (only 'exp')", path=source, key=f"{key}.type")
        if not (self.start_lr > 0 and self.stop_lr > 0):
            raise ConfigError("start_lr and stop_lr must be > 0", path=source, key=f"{key}.start_lr")
        if not self.stop_lr <= self.start_lr:
            raise ConfigError(f"stop_lr ({self.stop_lr:g}) must not exceed start_lr ({self.start_lr:g}): the rate would grow", path=source, key=f"{key}.stop_lr")
        if self.decay_steps < 1:
            raise ConfigError("must be >= 1", path=source, key=f"{key}.decay_steps")


@dataclass(frozen=True)
class LossConfig:
    """Energy/force/virial loss; prefactors move from start_pref_* to limit_pref_* with lr/start_lr."""

    type: str = "ener"
    start_pref_e: float = 0.02
    limit_pref_e: float = 1.0
    start_pref_f: float = 1000.0
    limit_pref_f: float = 1.0
    start_pref_v: float = 0.0
    limit_pref_v: float = 0.0
    start_pref_ae: float = unsupported(0.0)
    limit_pref_ae: float = unsupported(0.0)
    start_pref_pf: float = unsupported(0.0)
    limit_pref_pf: float = unsupported(0.0)
    relative_f: Optional[float] = unsupported(None)
    enable_atom_ener_coeff: bool = unsupported(False)
    use_l1_all: bool = unsupported(False)
    normalize_prefactors: bool = False

    def check(self, key: str, source: str | None) -> None:
        if self.type != "ener":
            raise ConfigError(f"loss type {self.type!r} is not supported (only 'ener')", path=source, key=f"{key}.type")
        for name in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v"):
            if not getattr(self, name) >= 0:
                raise ConfigError("prefactors must be >= 0", path=source, key=f"{key}.{name}")
        if not any(getattr(self, name) > 0 for name in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v")):
            raise ConfigError("every prefactor is 0: the loss would be zero and nothing would be learnt", path=source, key=f"{key}.start_pref_e")


@dataclass(frozen=True)
class DataConfig:
    """A set of systems: paths to deepmd/npy directories, frames files (.nc) or extxyz files."""

    systems: Union[Tuple[str, ...], str] = ()
    batch_size: Union[int, str, Tuple[int, ...]] = "auto"
    auto_prob: str = field(default="prob_sys_size", metadata={"dpelt_aliases": ("auto_prob_style",)})
    numb_btch: int = 1
    sys_probs: Optional[Tuple[float, ...]] = unsupported(None)
    set_prefix: str = unsupported("set")

    def check(self, key: str, source: str | None) -> None:
        bad = ConfigError(f"batch_size must be an integer >= 1, 'auto', 'auto:N' (N >= 1) or a list of integers >= 1 (one per system), got {self.batch_size!r}", path=source, key=f"{key}.batch_size")
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                head, _, n = self.batch_size.partition(":")
                if head != "auto" or not n.strip().isdigit() or int(n) < 1:
                    raise bad
        elif isinstance(self.batch_size, tuple):
            if not self.batch_size or any(b < 1 for b in self.batch_size):
                raise bad  # the length is checked against the systems found (a path may hold several)
        elif self.batch_size < 1:
            raise bad
        if self.auto_prob not in ("prob_sys_size", "prob_uniform"):
            raise ConfigError(f"auto_prob must be 'prob_sys_size' or 'prob_uniform', got {self.auto_prob!r}", path=source, key=f"{key}.auto_prob")
        if self.numb_btch < 1:
            raise ConfigError("must be >= 1", path=source, key=f"{key}.numb_btch")

    @property
    def system_list(self) -> list[str]:
        return [self.systems] if isinstance(self.systems, str) else list(self.systems)


@dataclass(frozen=True)
class TrainingSection:
    """The ``training`` section (DeePMD-kit names, plus ``threads``)."""

    training_data: DataConfig = field(default_factory=DataConfig)
    validation_data: Optional[DataConfig] = None
    numb_steps: int = field(default=1000, metadata={"dpelt_aliases": ("stop_batch",)})
    seed: Optional[int] = None
    disp_file: str = "lcurve.out"
    disp_freq: int = 1000
    save_freq: int = 1000
    save_ckpt: str = "model.ckpt"
    max_ckpt_keep: int = 5
    disp_training: bool = True
    time_training: bool = True
    stat_file: Optional[str] = None
    threads: Optional[int] = None
    profiling: bool = unsupported(False)
    tensorboard: bool = unsupported(False)
    mixed_precision: Optional[dict] = unsupported(None)
    change_bias_after_training: bool = False

    def check(self, key: str, source: str | None) -> None:
        if self.numb_steps < 0:
            raise ConfigError("must be >= 0", path=source, key=f"{key}.numb_steps")
        for name in ("disp_freq", "save_freq"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", path=source, key=f"{key}.{name}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("must be >= 1", path=source, key=f"{key}.threads")
        if not self.training_data.system_list:
            raise ConfigError("no training systems given", path=source, key=f"{key}.training_data.systems")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training input: model, learning_rate, loss, training."""

    model: ModelConfig
    learning_rate: LearningRateConfig = field(default_factory=LearningRateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingSection = field(default_factory=TrainingSection)

    @property
    def seed(self) -> int:
        return int(self.training.seed) if self.training.seed is not None else 0


def _resolve(paths: Tuple[str, ...] | str, base: Path) -> Tuple[str, ...]:
    items = [paths] if isinstance(paths, str) else list(paths)
    return tuple(str(p) if os.path.isabs(p) else os.path.normpath(str(base / p)) for p in items)


def load_train_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Read a dpelt YAML or DeePMD-kit ``input.json``; relative data paths are taken relative to the file."""
    path = Path(path)
    data = load_mapping(path)
    return parse_train_config(data, source=str(path), base=path.parent)


def parse_train_config(data: dict, source: str | None = None, base: Path | None = None) -> TrainConfig:
    """Parse a training mapping; ``base`` resolves relative system paths."""
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}
    if "model" not in data:
        raise ConfigError("missing section (type_map, descriptor, fitting_net)", path=source, key="model")
    cfg = parse_dataclass(TrainConfig, data, "", source)
    if base is not None:
        t = cfg.training
        td = replace(t.training_data, systems=_resolve(t.training_data.systems, base))
        vd = None if t.validation_data is None else replace(t.validation_data, systems=_resolve(t.validation_data.systems, base))
        cfg = replace(cfg, training=replace(t, training_data=td, validation_data=vd))
    return cfg
