"""Oracles that fail in the ways a real labeler does, for the init/holdout oracle-MD tests.

Each is EMT until its ``fail_after``-th calculation, then: reports an unconverged SCF
(``UnconvergedEMT``) or raises (``CrashingEMT``)."""

from ase.calculators.emt import EMT


class _CountingEMT(EMT):
    def __init__(self, fail_after: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.fail_after = fail_after
        self.calls = 0

    def calculate(self, *args, **kwargs):
        self.calls += 1
        super().calculate(*args, **kwargs)


class UnconvergedEMT(_CountingEMT):
    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["converged"] = self.calls < self.fail_after


class CrashingEMT(_CountingEMT):
    def calculate(self, *args, **kwargs):
        if self.calls + 1 >= self.fail_after:
            raise RuntimeError("segfault in SCF")
        super().calculate(*args, **kwargs)
