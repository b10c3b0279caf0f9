"""An oracle that crashes once (the first calculation ever, marked by a file), then works: EMT."""

from pathlib import Path

from ase.calculators.emt import EMT


class FlakyEMT(EMT):
    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = Path(marker)

    def calculate(self, *args, **kwargs):
        if not self.marker.exists():
            self.marker.write_text("crashed once\n")
            raise RuntimeError("simulated node failure")
        super().calculate(*args, **kwargs)
