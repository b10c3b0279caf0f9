"""A deliberately slow EMT oracle (tests kill the workflow while it labels)."""

import time

from ase.calculators.emt import EMT


class SlowEMT(EMT):
    """EMT that takes ``delay`` seconds per calculation."""

    def __init__(self, delay: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, *args, **kwargs):
        time.sleep(self.delay)
        super().calculate(*args, **kwargs)
