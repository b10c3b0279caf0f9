"""Interoperability with DeePMD-kit: se_e2_a models to and from DeePMD-kit 3.x model files.

``export_deepmd`` writes DeePMD-kit's backend-independent format (``.dp`` HDF5 or ``.yaml``),
which ``dp convert-backend`` turns into a ``.pth`` for DeePMD-kit's ``DeepPot``, ``dp test``,
its ASE calculator and LAMMPS' ``pair_style deepmd``; ``import_deepmd`` reads ``.dp``,
``.yaml``/``.yml``, frozen ``.pth`` and ``.pt`` checkpoints of DeePMD-kit's PyTorch backend
(without importing DeePMD-kit and without running code from the file).
"""

from .deepmd_format import export_deepmd, import_deepmd

__all__ = ["export_deepmd", "import_deepmd"]
