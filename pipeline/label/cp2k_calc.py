"""The ``cp2k`` oracle: periodic Kohn-Sham DFT (Quickstep, GPW) through ASE's CP2K calculator.

Settings and their defaults are the schema's ``label.$defs.cp2k`` (pipeline/schema.yaml), read
from there by :func:`cp2k_defaults`: PBE, DZVP-MOLOPT-SR-GTH in BASIS_MOLOPT, GTH-PBE
pseudopotentials in POTENTIAL, a 400 Ry density cutoff with REL_CUTOFF 50 Ry, MAX_SCF 50,
EPS_SCF 1e-6, the analytical stress tensor when the cell is periodic, and the command
``env OMP_NUM_THREADS=<label threads> cp2k_shell``.

One ``cp2k_shell`` serves a whole label job (:class:`Cp2kSession`): starting it is part of the
cost. Every frame gets a fresh force environment (DESTROY + LOAD) with its output file
``cp2k.out`` in the frame's task directory, so that

* a label does not depend on which frames the job labelled before it (CP2K would otherwise
  start the SCF from the previous frame's wavefunction): the same frame, settings and thread
  count give the same bits in any job (checked in tests/test_cp2k.py);
* the SCF convergence of *this* frame is read from its own output. CP2K 2023 does not stop
  when the SCF fails to converge within MAX_SCF: it prints ``SCF run NOT converged`` and goes on
  to the forces. ASE's shell interface does not pass that on, so :func:`read_scf_converged`
  looks for the marker in the part of ``cp2k.out`` written by this evaluation.

Units: ASE asks the shell for eV and Å (``UNITS_EV_A``); stress comes back in eV/Å³ with ASE's
sign (positive = tensile; ASE flips CP2K's sign), checked against a finite difference of the
energy under cell strain in tests/test_cp2k.py.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import ase
from ase.units import Rydberg

from ..errors import ConfigError
from .timeout import descendants

#: Printed by CP2K (qs_scf.F) when the SCF stops at MAX_SCF without reaching EPS_SCF.
NOT_CONVERGED = "SCF run NOT converged"
#: Printed by CP2K at the end of every energy (and force) evaluation.
EVALUATED = "ENERGY| Total FORCE_EVAL"
#: Where Debian's cp2k-data (and CP2K's default build) keeps basis sets and potentials.
DEFAULT_DATA_DIR = "/usr/share/cp2k"
OUTPUT = "cp2k.out"
SHELL_EXIT_S = 10.0  # grace for a cp2k_shell asked to EXIT before it is killed


@functools.lru_cache(maxsize=1)
def cp2k_defaults() -> dict[str, Any]:
    """The cp2k oracle's keyword arguments and defaults (schema ``label.$defs.cp2k``)."""
    from ..runconfig import schema

    props = schema()["properties"]["label"]["$defs"]["cp2k"]["properties"]
    return {k: v.get("default") for k, v in props.items()}


def cp2k_kwargs(kwargs: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """``kwargs`` with the defaults filled in; unknown or ill-typed keys are a ConfigError."""
    defaults = cp2k_defaults()
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown cp2k settings {unknown}; known: {sorted(defaults)}", path=source, key="oracle.kwargs")
    kw = defaults | dict(kwargs)
    for key in ("cutoff_Ry", "rel_cutoff_Ry", "eps_scf"):
        if not isinstance(kw[key], (int, float)) or isinstance(kw[key], bool) or not kw[key] > 0:
            raise ConfigError(f"must be a number > 0, got {kw[key]!r}", path=source, key=f"oracle.kwargs.{key}")
    if not isinstance(kw["max_scf"], int) or isinstance(kw["max_scf"], bool) or kw["max_scf"] < 1:
        raise ConfigError(f"must be an integer >= 1, got {kw['max_scf']!r}", path=source, key="oracle.kwargs.max_scf")
    for key in ("xc", "basis_set", "basis_set_file", "pseudo_potential", "potential_file"):
        if not isinstance(kw[key], str) or not kw[key].strip():
            raise ConfigError(f"must be a non-empty string, got {kw[key]!r}", path=source, key=f"oracle.kwargs.{key}")
    if kw["stress"] not in (None, True, False):
        raise ConfigError(f"must be true, false or null (periodic cells only), got {kw['stress']!r}", path=source, key="oracle.kwargs.stress")
    return kw


def data_file(name: str, kw: Mapping[str, Any]) -> Path:
    """A basis or potential file as CP2K finds it: absolute, else in ``data_dir``
    (else $CP2K_DATA_DIR, else /usr/share/cp2k)."""
    p = Path(name)
    if p.is_absolute():
        return p
    return Path(kw.get("data_dir") or os.environ.get("CP2K_DATA_DIR") or DEFAULT_DATA_DIR) / p


def _names_by_element(path: Path) -> dict[str, set[str]]:
    """{element (capitalised): names} of a CP2K basis or potential file (``El NAME [ALIAS ...]`` headers)."""
    from ase.data import atomic_numbers

    out: dict[str, set[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0].capitalize() in atomic_numbers and not parts[1][0].isdigit():
            out.setdefault(parts[0].capitalize(), set()).update(p.upper() for p in parts[1:])
    return out


def check_cp2k_elements(kw: Mapping[str, Any], symbols: Iterable[str], source: str = "config") -> None:
    """Refuse, before any job runs, an element without the basis set or pseudopotential asked for,
    naming the element, the name looked for and the file searched."""
    for what, file_key, name_key in (("basis set", "basis_set_file", "basis_set"), ("pseudopotential", "potential_file", "pseudo_potential")):
        path = data_file(kw[file_key], kw)
        if not path.is_file():
            raise ConfigError(f"the CP2K {what} file {path} does not exist (apt-get install cp2k-data, or set data_dir / $CP2K_DATA_DIR)", path=source, key=f"oracle.kwargs.{file_key}")
        table = _names_by_element(path)
        for s in symbols:
            if kw[name_key].upper() not in table.get(s, set()):
                raise ConfigError(f"no {what} {kw[name_key]!r} for element {s} in {path}", path=source, key=f"oracle.kwargs.{name_key}")


def input_template(kw: Mapping[str, Any]) -> str:
    """The CP2K input ASE's calculator does not write itself (REL_CUTOFF, EPS_SCF, no restart
    files), merged into the user's ``inp``; a keyword given twice is a ConfigError."""
    from ase.calculators.cp2k import parse_input

    root = parse_input(kw.get("inp") or "")
    try:
        root.add_keyword("FORCE_EVAL/DFT/MGRID", f"REL_CUTOFF [Ry] {float(kw['rel_cutoff_Ry']):.10g}")
        root.add_keyword("FORCE_EVAL/DFT/SCF", f"EPS_SCF {float(kw['eps_scf']):.10g}")
        root.add_keyword("FORCE_EVAL/DFT/SCF/PRINT/RESTART", "_SECTION_PARAMETERS_ OFF")
    except Exception as exc:
        raise ConfigError(f"the cp2k input template clashes with the settings dpelt writes itself: {exc}", key="oracle.kwargs.inp") from None
    return "\n".join(root.write())


def shell_command(kw: Mapping[str, Any]) -> str:
    """``command``, else ``env OMP_NUM_THREADS=<n> cp2k_shell`` with n = $OMP_NUM_THREADS (the
    label job's threads, set by the workflow) or 1: sums, hence labels, depend on it."""
    if kw.get("command"):
        return str(kw["command"])
    threads = os.environ.get("OMP_NUM_THREADS", "").strip() or "1"
    return f"env OMP_NUM_THREADS={threads} cp2k_shell"


def read_scf_converged(path: Path, offset: int = 0) -> bool | None:
    """From ``path`` past byte ``offset`` (what one evaluation wrote): False when CP2K printed
    :data:`NOT_CONVERGED`, True when it finished an evaluation without it, None when no
    evaluation finished there (or no file)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    if NOT_CONVERGED in text:
        return False
    return True if EVALUATED in text else None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (the shell, mpiexec, the cp2k binary)."""
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def cp2k_calculator(kw: Mapping[str, Any], directory: str | os.PathLike | None = None):
    """ASE's CP2K calculator for the filled settings ``kw`` (:func:`cp2k_kwargs`), its files
    ``cp2k.*`` in ``directory``; it starts a ``cp2k_shell`` at once (stop it with ``close()``)."""
    from ase.calculators.cp2k import CP2K

    params = dict(
        xc=kw["xc"],
        basis_set=kw["basis_set"],
        basis_set_file=str(data_file(kw["basis_set_file"], kw)),
        pseudo_potential=kw["pseudo_potential"],
        potential_file=str(data_file(kw["potential_file"], kw)),
        cutoff=float(kw["cutoff_Ry"]) * Rydberg,
        max_scf=int(kw["max_scf"]),
        charge=kw["charge"],
        uks=bool(kw["uks"]),
        multiplicity=kw["multiplicity"],
        print_level=kw["print_level"],
        inp=input_template(kw),
    )
    calc = CP2K(command=shell_command(kw), label="cp2k", **params)
    calc._shell.send(f"CD {Path(directory or '.').resolve()}")  # (see Cp2kSession.compute)
    calc._shell.expect("* READY")
    return calc


class Cp2kSession:
    """One ``cp2k_shell`` for a label job, reused across its frames; a context manager that
    stops the shell whatever happens (EXIT, then killed with its child processes).

    After a frame fails in any way (an exception, a timeout that killed the shell) the shell
    is discarded, and the next frame starts a new one: a half-finished shell is never reused.
    """

    def __init__(self, kw: Mapping[str, Any]):
        self.kw = dict(kw)
        self.calc = None
        self.starts = 0  # shells started (for tests and logs)

    def __enter__(self) -> "Cp2kSession":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, directory: Path):
        self.starts += 1
        try:
            self.calc = cp2k_calculator(self.kw, directory)
        except Exception as exc:  # ASE's messages do not say which command failed
            raise RuntimeError(f"cp2k_shell did not start ({shell_command(self.kw)}): {type(exc).__name__}: {exc}") from None
        return self.calc

    def compute(self, atoms: ase.Atoms, directory: str | os.PathLike) -> dict:
        """Label ``atoms`` in ``directory`` (its ``cp2k.inp``/``cp2k.out``): energy (eV), forces
        (eV/Å), stress (eV/Å³, periodic cells) and ``converged`` read from CP2K's output."""
        from .oracles import label_results

        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            calc = self.calc if self.calc is not None else self._start(directory)
            calc._release_force_env()  # (left by a failed frame) a fresh force environment: no history, own output
            # CP2K aborts on a PROJECT name over 80 characters (the label): the shell moves into
            # the task directory instead, and the files keep the short name cp2k.*
            calc._shell.send(f"CD {directory}")
            calc._shell.expect("* READY")
            calc.label = "cp2k"
            periodic = bool(atoms.pbc.any())
            calc.set(stress_tensor=periodic if self.kw["stress"] is None else bool(self.kw["stress"]) and periodic)
            calc.reset()
            out = directory / OUTPUT
            offset = _file_size(out)
            atoms = atoms.copy()
            atoms.calc = calc
            result = label_results(calc, atoms)
            calc._release_force_env()  # CP2K completes (flushes) the output file of a destroyed force environment only
        except BaseException as exc:
            died = self._exit_code()
            self.stop()
            if died is not None and isinstance(exc, Exception):  # (not a timeout, SIGTERM or Ctrl-C: those say more)
                raise RuntimeError(f"cp2k_shell ({shell_command(self.kw)}) died with exit code {died}{_tail(directory / OUTPUT)}") from None
            raise
        result["converged"] = read_scf_converged(out, offset)
        if result["converged"] is None:  # an evaluation we cannot find in the output is no label
            raise RuntimeError(f"CP2K returned results but {out} has no finished evaluation ({EVALUATED!r})")
        return result

    def _exit_code(self) -> int | None:
        child = getattr(getattr(self.calc, "_shell", None), "_child", None)
        return None if child is None else child.poll()

    def stop(self) -> None:
        """Ask the shell to EXIT; kill it (and its children) when it does not within
        SHELL_EXIT_S or is not ready. Never raises."""
        calc, self.calc = self.calc, None
        shell = getattr(calc, "_shell", None)
        child = getattr(shell, "_child", None)
        if calc is not None:
            calc._shell = None  # ASE's own close (also run by __del__) must not touch it again
        if child is None:
            return
        pid = child.pid
        try:
            if shell.isready and child.poll() is None:
                child.stdin.write("EXIT\n")
                child.stdin.flush()
                child.wait(timeout=SHELL_EXIT_S)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        finally:
            if child.poll() is None:
                _kill_tree(pid)
            for stream in (child.stdin, child.stdout):
                try:
                    stream.close()
                except Exception:
                    pass
            try:
                child.wait(timeout=SHELL_EXIT_S)
            except Exception:
                pass
            shell._child = None
            shell.isready = False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return " (no CP2K output)"
    return "; last lines of " + str(path) + ": " + " | ".join(" ".join(t.split()) for t in text) if text else ""

