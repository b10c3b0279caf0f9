"""A deliberately slow EMT oracle (tests kill the workflow while it labels)."""

import sys
import time

from ase.calculators.emt import EMT


class SlowEMT(EMT):
    """EMT that takes ``delay`` seconds per calculation of a `dpelt label` step (init and holdout,
    which label many MD frames, run at EMT speed)."""

    def __init__(self, delay: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, *args, **kwargs):
        if sys.argv[1:2] == ["label"]:
            time.sleep(self.delay)
        super().calculate(*args, **kwargs)
