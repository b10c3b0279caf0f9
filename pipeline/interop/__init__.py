"""Interoperability with DeePMD-kit: se_e2_a models to and from DeePMD-kit 3.x model files.

``export_deepmd`` writes DeePMD-kit's backend-independent format (``.dp`` HDF5 or ``.yaml``),
which ``dp convert-backend`` turns into a ``.pth`` for DeePMD-kit's ``DeepPot``, ``dp test``,
its ASE calculator and LAMMPS' ``pair_style deepmd``; ``import_deepmd`` reads ``.dp``,
``.yaml``/``.yml`` and frozen ``.pth`` files of DeePMD-kit's PyTorch backend (without importing
DeePMD-kit and without running code from the file). A ``.pt`` training checkpoint is refused
with the command that freezes or converts it.
"""

__all__ = ["export_deepmd", "import_deepmd"]


def __getattr__(name: str):
    # imported on first use: `dpelt --help` and the CLI's other commands do not pay for torch here
    if name == "export_deepmd":
        from .deepmd_export import export_deepmd

        return export_deepmd
    if name == "import_deepmd":
        from .deepmd_import import import_deepmd

        return import_deepmd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
