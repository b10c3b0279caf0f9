"""An oracle that crashes once, then works (EMT): the first calculation of a `dpelt label` step
ever (marked by a file) raises, as a node failure would. Other steps (init, holdout) never crash."""

import sys
from pathlib import Path

from ase.calculators.emt import EMT


class FlakyEMT(EMT):
    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = Path(marker)

    def calculate(self, *args, **kwargs):
        if sys.argv[1:2] == ["label"] and not self.marker.exists():
            self.marker.write_text("crashed once\n")
            raise RuntimeError("simulated node failure")
        super().calculate(*args, **kwargs)
