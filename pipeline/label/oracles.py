"""Oracles: the first-principles (or stand-in) calculators that label candidate frames.

An oracle is given in the config as ``{"name": ..., "kwargs": {...}}``:

=============================== ==============================================================
name                             calculator
=============================== ==============================================================
``emt``                          ASE's EMT (the embedded default: instant, deterministic;
                                 Al Cu Ag Au Ni Pd Pt and H C N O only)
``xtb``                          GFN2-xTB through tblite (``tblite.ase.TBLite``; periodic with
                                 stress, or molecules); default ``method="GFN2-xTB"``,
                                 ``verbosity=0``, and ``threads=1`` (OpenMP threads while
                                 labelling; null leaves the runtime's setting)
``pyscf``                        molecular DFT / HF through PySCF (:mod:`.pyscf_calc`):
                                 ``basis``, ``xc``, ``charge``, ``spin``, ``max_cycle``,
                                 ``conv_tol``; refuses periodic systems
``cp2k``                         periodic DFT through ASE's CP2K calculator and one
                                 ``cp2k_shell`` per label job (:mod:`.cp2k_calc`; settings and
                                 defaults: the schema's ``label.$defs.cp2k``)
dotted path, e.g.                any ASE calculator class, built with ``kwargs``; file-based
``ase.calculators.vasp.Vasp``    calculators run in their own task directory
=============================== ==============================================================

Frames are labelled through a session (:meth:`Oracle.session`, one per job): every task gets
a fresh calculator, except with ``cp2k``, whose session keeps one ``cp2k_shell`` running. Labels come back in eV (energy), eV/Å (forces) and eV/Å³
(stress, periodic systems only). The energy is the force-consistent one: ASE's
``free_energy`` when the calculator provides it (what VASP calls TOTEN, DP-GEN's choice),
else ``energy``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import inspect
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ase
import numpy as np
from ase.calculators.calculator import PropertyNotImplementedError
from ase.data import atomic_numbers

from ..errors import ConfigError
from .timeout import kill_descendants, running_children
from .validate import scf_converged

BUILTIN = ("emt", "xtb", "pyscf", "cp2k")
#: Heaviest element GFN1/GFN2-xTB are parametrised for (Rn).
XTB_MAX_Z = 86


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run the body with at most ``n`` OpenMP (libgomp) threads in the calling thread; None: unchanged.

    The previous setting is restored afterwards. Used for tblite, whose many short parallel
    regions crawl when the cores are shared with other jobs, and whose sums are only
    bit-reproducible with a fixed thread count.
    """
    if n is None:
        yield
        return
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the already loaded runtime when there is one
        get_max, set_num = gomp.omp_get_max_threads, gomp.omp_set_num_threads
    except (OSError, AttributeError):
        yield
        return
    previous = int(get_max())
    set_num(int(n))
    try:
        yield
    finally:
        set_num(previous)


def label_results(calc: Any, atoms: ase.Atoms) -> dict:
    """A labelled structure's results from ``calc``: ``{"energy": eV, "forces": [[eV/Å]],
    "stress": [eV/Å³] | None, "converged": bool | None}``, the calculator's own raw values (no
    constraints, no reshaping) for :func:`check_label`. The force-consistent (free) energy when
    the calculator has one; stress for any periodic direction, None when not implemented."""
    energy = calc.get_potential_energy(atoms)
    results = getattr(calc, "results", None)
    if isinstance(results, Mapping) and results.get("free_energy") is not None:
        energy = results["free_energy"]  # force-consistent (never triggers a new calculation)
    forces = calc.get_forces(atoms)
    stress = None
    if atoms.pbc.any():
        try:
            stress = calc.get_stress(atoms)
        except (PropertyNotImplementedError, NotImplementedError):
            stress = None
    return {"energy": _to_float(energy), "forces": forces, "stress": stress, "converged": scf_converged(calc)}


@dataclass(frozen=True)
class Oracle:
    """A named recipe for calculators: ``factory(**kwargs)`` gives a fresh one per task.

    ``name`` is what frames record in their ``oracle`` coordinate; ``spec`` is the normalised
    config entry (used to tell whether a cached task result came from the same oracle).
    """

    name: str
    kwargs: Mapping[str, Any]
    factory: Callable[..., Any]
    accepts_directory: bool
    molecular_only: bool = False
    spec: Mapping[str, Any] = field(default_factory=dict)
    source: str = "config"
    threads: int | None = None

    def session(self) -> "OracleSession":
        """A labeling session for one job (a context manager): ``session.compute(atoms, dir)``
        labels a frame; the session's code server, if any, is stopped at its end."""
        if self.name == "cp2k":
            from .cp2k_calc import Cp2kSession

            return OracleSession(self, Cp2kSession(self.kwargs))
        return OracleSession(self, None)

    def calculator(self, directory: str | os.PathLike | None = None) -> Any:
        """A new calculator; calculators that take a ``directory`` work in ``directory``."""
        kw = dict(self.kwargs)
        if directory is not None and self.accepts_directory:
            kw["directory"] = str(Path(directory).resolve())
        try:
            return self.factory(**kw)
        except Exception as exc:
            raise ConfigError(f"cannot build oracle {self.name!r} with kwargs {dict(self.kwargs)}: {type(exc).__name__}: {exc}", path=self.source, key="oracle.kwargs") from None

    def check_system(self, symbols: Iterable[str], pbc: Sequence[bool], where: str | None = None) -> None:
        """Refuse, before any work, elements or periodicity this oracle cannot handle (ConfigError)."""
        check_elements(self.spec, symbols, source=self.source)
        if self.molecular_only and any(bool(p) for p in pbc):
            raise ConfigError(
                f"oracle {self.name!r} is molecular and cannot label the periodic system{' in ' + where if where else ''} (pbc={[bool(p) for p in pbc]}); use xtb or a plane-wave code (e.g. ase.calculators.vasp.Vasp) for periodic systems",
                path=self.source,
                key="oracle.name",
            )

    def compute(self, atoms: ase.Atoms, directory: str | os.PathLike | None = None) -> dict:
        """Label one structure in a session of its own (see :meth:`session`): : ``{"energy": eV, "forces": [[eV/Å]], "stress": [eV/Å³] | None, "converged": bool | None}``.

        Exceptions from the calculator propagate (the caller records them as failures); only
        building the calculator raises :class:`ConfigError`. Stress is asked for only when
        the system is periodic, and is None when the calculator does not implement it.
        """
        with self.session() as session:
            return session.compute(atoms, directory)

    def _fresh_compute(self, atoms: ase.Atoms, directory: str | os.PathLike | None) -> dict:
        calc = self.calculator(directory)
        atoms = atoms.copy()
        atoms.calc = calc
        with omp_threads(self.threads):
            return self._compute(calc, atoms)

    def _compute(self, calc: Any, atoms: ase.Atoms) -> dict:
        try:
            return label_results(calc, atoms)
        finally:
            close = getattr(calc, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    pass


class Terminated(BaseException):
    """The labeler got SIGTERM (a cancelled Snakemake or Slurm job): raised where it runs, so that
    the session stops its code server (which would otherwise go on computing, orphaned)."""


def _terminate(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


class OracleSession:
    """The frames of one job go through here (:meth:`Oracle.session`).

    ``spare``: the processes that ran before the session began; a label's time limit kills
    every other process below the labeler, so a hung code server the session started is
    stopped too (and the session starts a new one for the next frame). SIGTERM (in the main
    thread) raises :class:`Terminated`: the session stops its server and the processes its
    calculators started, and the job ends with the exception.
    """

    def __init__(self, oracle: Oracle, server: Any):
        self.oracle = oracle
        self.server = server
        self.spare: set[int] = set()

    def __enter__(self) -> "OracleSession":
        self.spare = running_children()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _terminate)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.server is not None:
                self.server.stop()
            if exc_type is Terminated:  # what the calculators started dies with the job
                kill_descendants(spare=self.spare)
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)

    def compute(self, atoms: ase.Atoms, directory: str | os.PathLike | None = None) -> dict:
        """Label one structure; see :meth:`Oracle.compute`."""
        if self.server is None:
            return self.oracle._fresh_compute(atoms, directory)
        return self.server.compute(atoms, directory if directory is not None else ".")


def _to_float(x: Any) -> Any:
    """A float when ``x`` is a numeric scalar; the value itself otherwise (validation says why)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return x
    return float(arr) if arr.ndim == 0 else arr


def _spec_parts(spec: Any, source: str) -> tuple[str, dict]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"must be a mapping with 'name' and optional 'kwargs', got {type(spec).__name__}", path=source, key="oracle")
    unknown = sorted(set(spec) - {"name", "kwargs"})
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; an oracle has 'name' and 'kwargs'", path=source, key="oracle")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"must be a non-empty string, got {name!r}", path=source, key="oracle.name")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"must be a mapping of calculator arguments, got {type(kwargs).__name__}", path=source, key="oracle.kwargs")
    return name.strip(), dict(kwargs)


def _import_dotted(path: str, source: str) -> Any:
    """Resolve ``package.module.Class`` (longest importable module prefix, then attributes)."""
    parts = path.split(".")
    tried = []
    errors = []
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        tried.append(module_name)
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and not (module_name == missing or module_name.startswith(missing + ".")):
                raise ConfigError(f"importing {module_name!r} (for {path!r}) needs a package that is not installed: {exc}", path=source, key="oracle.name") from None
            errors.append(f"{module_name}: {exc}")
            continue
        except Exception as exc:  # the module exists but fails to import: say so, do not guess further
            raise ConfigError(f"importing {module_name!r} (for {path!r}) failed: {type(exc).__name__}: {exc}", path=source, key="oracle.name") from None
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {'.'.join(parts[cut:])!r} (from {path!r})", path=source, key="oracle.name") from None
        return obj
    raise ConfigError(
        f"cannot import the calculator {path!r}: tried modules {tried}" + (f" ({'; '.join(errors[:1])})" if errors else ""),
        path=source,
        key="oracle.name",
    )


def _accepts_directory(factory: Callable[..., Any]) -> bool:
    """True when ``factory`` takes a ``directory`` argument (every ASE Calculator does)."""
    try:
        from ase.calculators.calculator import BaseCalculator

        if inspect.isclass(factory) and issubclass(factory, BaseCalculator):
            return True
    except ImportError:
        pass
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    return "directory" in sig.parameters


def _builtin(name: str, kwargs: dict, source: str) -> Oracle:
    spec = {"name": name, "kwargs": kwargs}
    if name == "emt":
        from ase.calculators.emt import EMT

        unknown = sorted(set(kwargs) - set(EMT.default_parameters))
        if unknown:  # EMT ignores unknown parameters: a typo would silently keep the default
            raise ConfigError(f"unknown EMT parameters {unknown}; known: {sorted(EMT.default_parameters)}", path=source, key="oracle.kwargs")

        return Oracle(name, kwargs, EMT, accepts_directory=False, spec=spec, source=source)
    if name == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError as exc:
            raise ConfigError(f"oracle 'xtb' needs tblite (pip install 'dpelt[xtb]', or conda install -c conda-forge tblite-python): tried 'tblite.ase.TBLite': {exc}", path=source, key="oracle.name") from None
        known = set(getattr(TBLite, "default_parameters", {})) | {"initial_guess", "ml_features", "threads"}
        unknown = sorted(set(kwargs) - known)
        if known and unknown:
            raise ConfigError(f"unknown tblite parameters {unknown}; known: {sorted(known)}", path=source, key="oracle.kwargs")
        kw = {"method": "GFN2-xTB", "verbosity": 0, "threads": 1} | kwargs
        threads = kw.pop("threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"threads must be a positive integer or null, got {threads!r}", path=source, key="oracle.kwargs.threads")
        spec = {"name": name, "kwargs": kw | {"threads": threads}}
        return Oracle(name, kw, TBLite, accepts_directory=False, spec=spec, source=source, threads=threads)
    if name == "cp2k":
        from .cp2k_calc import cp2k_kwargs, cp2k_calculator

        kw = cp2k_kwargs(kwargs, source)
        return Oracle(name, kw, functools.partial(cp2k_calculator, kw), accepts_directory=True, spec={"name": name, "kwargs": kw}, source=source)
    # pyscf
    try:
        import pyscf  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"oracle 'pyscf' needs PySCF (pip install 'dpelt[pyscf]'): tried 'import pyscf': {exc}", path=source, key="oracle.name") from None
    from .pyscf_calc import PySCFCalculator

    kw = dict(PySCFCalculator.default_parameters) | kwargs
    return Oracle(name, kw, PySCFCalculator, accepts_directory=False, molecular_only=True, spec={"name": name, "kwargs": kw}, source=source)


def make_oracle(spec: Mapping[str, Any] | str, source: str = "config") -> Oracle:
    """Build an :class:`Oracle` from ``{"name": ..., "kwargs": {...}}`` (``source``: file named in errors).

    Unknown names, missing packages and unimportable dotted paths raise :class:`ConfigError`
    naming ``oracle.name``; arguments a built-in calculator rejects raise it naming
    ``oracle.kwargs``. Nothing is computed here.
    """
    name, kwargs = _spec_parts(spec, source)
    if name.lower() in BUILTIN:
        oracle = _builtin(name.lower(), kwargs, source)
        if oracle.name != "cp2k":  # (cp2k's kwargs are checked without starting a shell)
            oracle.calculator()  # a cheap probe: bad kwargs are a config error, found before any work
        return oracle
    if "." not in name:
        raise ConfigError(
            f"unknown oracle {name!r}: built in are {', '.join(BUILTIN)}; otherwise give the dotted path of an ASE calculator class, e.g. ase.calculators.vasp.Vasp",
            path=source,
            key="oracle.name",
        )
    factory = _import_dotted(name, source)
    if not callable(factory):
        raise ConfigError(f"{name!r} is not a calculator class or factory (got {type(factory).__name__})", path=source, key="oracle.name")
    return Oracle(name, kwargs, factory, accepts_directory=_accepts_directory(factory), spec={"name": name, "kwargs": kwargs}, source=source)


def supported_elements(spec: Mapping[str, Any] | str) -> set[str] | None:
    """Elements the named oracle can handle, or None when it cannot be told in advance."""
    name, kwargs = _spec_parts(spec, "config")
    name = name.lower()
    if name == "emt":
        from ase.calculators.emt import parameters

        return set(parameters)
    if name == "xtb":
        return {s for s, z in atomic_numbers.items() if 1 <= z <= XTB_MAX_Z and s != "X"}
    return None


def check_elements(spec: Mapping[str, Any] | str, symbols: Iterable[str], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the first element the oracle cannot handle.

    EMT knows only its parametrised elements (``ase.calculators.emt.parameters``); xTB
    elements H-Rn; PySCF whatever its basis set covers (checked when PySCF is installed);
    CP2K whether its basis and pseudopotential files name the element; other calculators are
    not checked here.
    """
    name, kwargs = _spec_parts(spec, source)
    symbols = sorted(set(symbols), key=lambda s: (atomic_numbers.get(s, 10**6), s))
    for s in symbols:
        if s not in atomic_numbers or s == "X":
            raise ConfigError(f"unknown element {s!r}", path=source, key="type_map")
    known = supported_elements({"name": name})
    if known is not None:
        for s in symbols:
            if s not in known:
                raise ConfigError(
                    f"oracle {name!r} cannot handle element {s} (it knows {', '.join(sorted(known, key=atomic_numbers.get)) if len(known) < 20 else 'H-Rn'})",
                    path=source,
                    key="oracle.name",
                )
    elif name.lower() == "cp2k":
        from .cp2k_calc import check_cp2k_elements, cp2k_kwargs

        check_cp2k_elements(cp2k_kwargs(kwargs, source), symbols, source)
    elif name.lower() == "pyscf":
        _check_pyscf_basis(kwargs.get("basis", "def2-svp"), symbols, source)


def _check_pyscf_basis(basis: Any, symbols: Sequence[str], source: str) -> None:
    if not isinstance(basis, str):
        return  # per-element basis dicts are PySCF's to check
    try:
        from pyscf import gto
    except ImportError:
        return
    for s in symbols:
        try:
            ok = bool(gto.basis.load(basis, s))
        except Exception:
            ok = False
        if not ok:
            raise ConfigError(f"oracle 'pyscf' cannot handle element {s}: basis {basis!r} has no functions for it", path=source, key="oracle.kwargs.basis")
