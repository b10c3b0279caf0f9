"""Labeling (the L of ELT): oracles, label validation, failure records (DESIGN §5).

``make_oracle`` builds an oracle from ``{"name": ..., "kwargs": {...}}`` (EMT, xtb through
tblite, PySCF, or any ASE calculator by dotted path); ``check_label`` says why a label cannot be
used; ``label`` runs the whole step (``dpelt label``). Units: eV, Å, eV/Å, eV/Å³.
"""

from .oracles import Oracle, check_elements, make_oracle
from .run import label
from .validate import check_label, scf_converged

__all__ = ["Oracle", "check_elements", "check_label", "label", "make_oracle", "scf_converged"]
