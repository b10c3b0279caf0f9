"""The ``model`` section, with DeePMD-kit's key names and defaults.

The model section of a DeePMD-kit ``input.json`` (se_e2_a descriptor, ``ener`` fitting) is
accepted as is. Options DeePMD-kit has but dpelt does not implement are refused unless they
hold their default value, naming the option.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

from ..config import parse_dataclass, unsupported
from ..errors import ConfigError

PRECISIONS = {"default": torch.float64, "float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class DescriptorConfig:
    """DeepPot-SE ``se_e2_a`` descriptor (DeePMD-kit names; lengths in Å)."""

    type: str = "se_e2_a"
    sel: Union[Tuple[int, ...], str] = "auto"
    rcut: float = 6.0
    rcut_smth: float = 0.5
    neuron: Tuple[int, ...] = (10, 20, 40)
    axis_neuron: int = field(default=4, metadata={"dpelt_aliases": ("n_axis_neuron",)})
    resnet_dt: bool = False
    type_one_side: bool = False
    precision: str = "default"
    seed: Optional[int] = None
    trainable: bool = True
    activation_function: str = unsupported("tanh")
    exclude_types: Tuple = unsupported([])
    set_davg_zero: bool = False
    env_protection: float = unsupported(0.0)

    def check(self, key: str, source: str | None) -> None:
        if self.type not in ("se_e2_a", "se_a"):
            raise ConfigError(
                f"descriptor type {self.type!r} is not supported: dpelt implements se_e2_a (DeepPot-SE)",
                path=source,
                key=f"{key}.type",
            )
        if not (math.isfinite(self.rcut) and self.rcut > 0):
            raise ConfigError(f"rcut must be a finite cut-off > 0 (Å), got {self.rcut}", path=source, key=f"{key}.rcut")
        if not 0 <= self.rcut_smth < self.rcut:
            raise ConfigError(f"need 0 <= rcut_smth < rcut, got rcut_smth={self.rcut_smth}, rcut={self.rcut}", path=source, key=f"{key}.rcut_smth")
        if isinstance(self.sel, str):
            if not (self.sel == "auto" or self.sel.startswith("auto:")):
                raise ConfigError(f"sel must be a list of integers, 'auto' or 'auto:<factor>', got {self.sel!r}", path=source, key=f"{key}.sel")
            if self.sel.startswith("auto:"):
                try:
                    factor = float(self.sel[5:])
                except ValueError:
                    raise ConfigError(f"bad factor in {self.sel!r}", path=source, key=f"{key}.sel") from None
                if not (math.isfinite(factor) and factor >= 1):
                    raise ConfigError(f"the factor of {self.sel!r} must be a number >= 1 (sel = factor x the largest neighbour count in the data)", path=source, key=f"{key}.sel")
        elif any(s < 1 for s in self.sel):
            raise ConfigError(f"every sel entry must be >= 1, got {list(self.sel)}", path=source, key=f"{key}.sel")
        if not self.neuron or any(n < 1 for n in self.neuron):
            raise ConfigError(f"neuron must be a non-empty list of positive widths, got {list(self.neuron)}", path=source, key=f"{key}.neuron")
        if not 1 <= self.axis_neuron <= self.neuron[-1]:
            raise ConfigError(f"axis_neuron must lie in [1, neuron[-1]={self.neuron[-1]}], got {self.axis_neuron}", path=source, key=f"{key}.axis_neuron")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}", path=source, key=f"{key}.precision")


@dataclass(frozen=True)
class FittingConfig:
    """Energy fitting net (DeePMD-kit ``fitting_net`` of type ``ener``)."""

    type: str = "ener"
    neuron: Tuple[int, ...] = (120, 120, 120)
    resnet_dt: bool = True
    precision: str = "default"
    seed: Optional[int] = None
    trainable: bool = True
    activation_function: str = unsupported("tanh")
    numb_fparam: int = unsupported(0)
    numb_aparam: int = unsupported(0)
    rcond: Optional[float] = None
    atom_ener: Tuple = unsupported([])

    def check(self, key: str, source: str | None) -> None:
        if self.type != "ener":
            raise ConfigError(f"fitting type {self.type!r} is not supported: dpelt fits energies (type 'ener')", path=source, key=f"{key}.type")
        if not self.neuron or any(n < 1 for n in self.neuron):
            raise ConfigError(f"neuron must be a non-empty list of positive widths, got {list(self.neuron)}", path=source, key=f"{key}.neuron")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}", path=source, key=f"{key}.precision")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: ``type_map``, ``descriptor``, ``fitting_net``."""

    type_map: Tuple[str, ...] = ()
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    fitting_net: FittingConfig = field(default_factory=FittingConfig)
    data_stat_nbatch: int = 10
    data_stat_protect: float = 1e-2
    type: str = unsupported("standard")
    use_srtab: Optional[str] = unsupported(None)
    type_embedding: Optional[dict] = unsupported(None)

    def check(self, key: str, source: str | None) -> None:
        if not self.type_map:
            raise ConfigError("type_map (element symbols, e.g. [O, H]) is required", path=source, key=f"{key}.type_map")
        if len(set(self.type_map)) != len(self.type_map):
            raise ConfigError(f"type_map has duplicates: {list(self.type_map)}", path=source, key=f"{key}.type_map")
        sel = self.descriptor.sel
        if not isinstance(sel, str) and len(sel) != len(self.type_map):
            raise ConfigError(
                f"sel has {len(sel)} entries but type_map has {len(self.type_map)} elements",
                path=source,
                key=f"{key}.descriptor.sel",
            )
        if self.descriptor.precision != self.fitting_net.precision and "default" not in (self.descriptor.precision, self.fitting_net.precision):
            raise ConfigError("descriptor and fitting_net precision differ; dpelt uses one precision per model", path=source, key=f"{key}.fitting_net.precision")
        if self.data_stat_nbatch < 1:
            raise ConfigError("must be >= 1", path=source, key=f"{key}.data_stat_nbatch")

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def dtype(self) -> torch.dtype:
        p = self.descriptor.precision if self.descriptor.precision != "default" else self.fitting_net.precision
        return PRECISIONS[p]


def parse_model_config(data: dict, key: str = "model", source: str | None = None) -> ModelConfig:
    """Parse a ``model`` mapping (DeePMD-kit input.json or dpelt YAML)."""
    return parse_dataclass(ModelConfig, data, key, source)
