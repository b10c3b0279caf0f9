"""Oracles that fail in the ways a real labeler does, for the init/holdout oracle-MD tests.

Each is EMT until its ``fail_after``-th calculation, then: reports an unconverged SCF
(``UnconvergedEMT``) or raises (``CrashingEMT``). Every labeling task builds a fresh calculator,
so the calculation is counted from the task directory: oracle MD step n runs in
``step.<n>`` (any other directory counts as the first calculation)."""

from pathlib import Path

from ase.calculators.emt import EMT


class _CountingEMT(EMT):
    def __init__(self, fail_after: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.fail_after = fail_after
        self.calls = 0

    def count(self) -> int:
        name = Path(self.directory).name
        self.calls = int(name.split(".")[1]) if name.startswith("step.") else 1
        return self.calls

    def calculate(self, *args, **kwargs):
        self.count()
        super().calculate(*args, **kwargs)


class UnconvergedEMT(_CountingEMT):
    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["converged"] = self.calls < self.fail_after


class CrashingEMT(_CountingEMT):
    def calculate(self, *args, **kwargs):
        if self.count() >= self.fail_after:
            raise RuntimeError("segfault in SCF")
        super().calculate(*args, **kwargs)


class HangingEMT(_CountingEMT):
    """A file-based code that never returns: from its ``fail_after``-th calculation on (or, with
    ``hang_in``, in the task directory of that name) it runs a shell that waits on a ``sleep``
    (pid in ``hang.pid``). With ``server``, its first calculation also starts a long-lived
    process (pid in ``server.pid``), as a socket calculator starts its code once per MD run."""

    def __init__(self, fail_after: int = 3, server: bool = False, hang_in: str | None = None, **kwargs):
        super().__init__(fail_after, **kwargs)
        self.server, self.hang_in = server, hang_in

    def calculate(self, *args, **kwargs):
        import subprocess
        from pathlib import Path

        super().calculate(*args, **kwargs)
        where = Path(self.directory)
        if self.server and self.calls == 1:
            where.mkdir(parents=True, exist_ok=True)
            (where / "server.pid").write_text(str(subprocess.Popen(["sleep", "600"]).pid))
        if (where.name == self.hang_in) if self.hang_in else self.calls >= self.fail_after:
            where.mkdir(parents=True, exist_ok=True)
            subprocess.run("sleep 600 & echo $! > hang.pid; wait", shell=True, cwd=where, check=True)
