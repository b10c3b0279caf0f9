"""Labeling (the L of ELT): oracles, label validation, failure records (DESIGN §5).

``make_oracle`` builds an oracle from ``{"name": ..., "kwargs": {...}}`` (EMT, xtb through
tblite, PySCF, CP2K, or any ASE calculator by dotted path); ``check_label`` says why a label cannot be
used; ``label`` runs the whole step (``dpelt label``). Units: eV, Å, eV/Å, eV/Å³.
"""

__all__ = ["Oracle", "check_elements", "check_label", "label", "make_oracle", "scf_converged"]

_WHERE = {"Oracle": "oracles", "check_elements": "oracles", "make_oracle": "oracles", "label": "run", "check_label": "validate", "scf_converged": "validate"}


def __getattr__(name: str):
    # imported on first use, so that `dpelt --help` does not load ASE's and xarray's modules
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
