"""dpelt: Deep Potential (se_e2_a) models and the concurrent-learning ELT loop.

The package never imports Snakemake: every physics piece is usable from a notebook,
e.g. ``from pipeline.calculator import DeepPotCalculator``.
"""

__version__ = "0.1.0"

# first, before any submodule imports torch: OpenMP's wait policy is read when torch loads libgomp
from . import runtime as _runtime  # noqa: E402,F401
