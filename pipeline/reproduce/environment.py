"""What bit-identity of a run depends on, recorded in every manifest by ``dpelt publish``.

Same config + same code + same machine gives bit-identical datasets and models. "Same
machine" means the entries of :data:`BIT_IDENTITY`: the dpelt code (a digest of the package's
source, since the version number does not change with every commit), Python, NumPy, torch
(which brings its own MKL/oneDNN), the vector instruction set torch dispatches to and the
fused embedding kernel is compiled for (``torch.backends.cpu.get_cpu_capability()``, see
:mod:`pipeline.model.embedding_kernel`), whether that kernel is used, the threads per job
(config ``threads``), the oracle and the version of the package that provides it, ASE (MD
integrators, EMT) and the HDF5 stack that writes the NetCDF files. :data:`INFORMATIONAL`
entries are recorded to help explain a difference but are not expected to cause one alone.

``dpelt reproduce`` prints :func:`differences` between the manifest and this machine before
it starts; docs/reproduce.md says what to expect for each.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

BIT_IDENTITY = (
    "dpelt",
    "dpelt_code_sha256",
    "python",
    "numpy",
    "torch",
    "cpu_capability",
    "embedding_kernel",
    "threads",
    "oracle",
    "oracle_package",
    "ase",
    "h5py",
    "hdf5",
    "xarray",
)
INFORMATIONAL = ("cpu_model", "platform", "cxx")

#: the package that computes each built-in oracle's labels (a dotted path names its own)
ORACLE_PACKAGE = {"emt": "ase", "xtb": "tblite", "pyscf": "pyscf"}


def code_digest(package_dir: Path | None = None) -> str:
    """sha256 over the dpelt package's source files (``*.py``, ``*.cpp``), paths and bytes in order."""
    package_dir = package_dir or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for p in package_dir.rglob("*") if p.suffix in (".py", ".cpp") and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(package_dir)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _distribution_version(module: str) -> str:
    """``"<distribution> <version>"`` of the installed package providing top-level ``module``."""
    top = module.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [top])
    for dist in dists:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{top} (version unknown)"


def oracle_package(oracle: Mapping[str, Any]) -> str:
    """The package (and version) that labels with ``oracle`` ({name, kwargs})."""
    name = str(oracle.get("name", "emt"))
    return _distribution_version(ORACLE_PACKAGE.get(name.lower(), name))


def embedding_kernel() -> str:
    """Which embedding-net path the jobs take here: ``fused (<isa>)`` or ``layer by layer (<why>)``.

    Decided without building: the kernel is used when it is enabled, not refused by an earlier
    build, and built already or buildable (a C++ compiler is on PATH)."""
    from ..model import embedding_kernel as ek

    if not ek.enabled_by_environment():
        return "layer by layer (DPELT_FUSED_KERNEL=0)"
    where = ek.build_directory()
    if (where / ek.FAILED).exists():
        return "layer by layer (the kernel failed to build)"
    built = (where / f"{ek.LIBRARY}.so").exists()
    compiler = os.environ.get("CXX", "c++")
    if not built and shutil.which(shlex.split(compiler)[0] if compiler.strip() else "c++") is None:
        return "layer by layer (no C++ compiler)"
    return f"fused ({ek._capability()})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cxx() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(shlex.split(compiler) + ["--version"], capture_output=True, text=True, timeout=20)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else "none"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "none"


def describe(config: Mapping[str, Any]) -> dict:
    """This machine's values of :data:`BIT_IDENTITY` and :data:`INFORMATIONAL` for a run config
    (validated, defaults filled: ``threads`` and ``label.oracle`` are read from it)."""
    import h5py
    import numpy
    import torch
    import xarray

    from .. import __version__

    oracle = dict(config["label"]["oracle"])
    return {
        "dpelt": __version__,
        "dpelt_code_sha256": code_digest(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability().lower(),
        "embedding_kernel": embedding_kernel(),
        "threads": dict(config["threads"]),
        "oracle": {"name": oracle["name"], "kwargs": dict(oracle.get("kwargs") or {})},
        "oracle_package": oracle_package(oracle),
        "ase": _distribution_version("ase").split(" ", 1)[1],
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "xarray": xarray.__version__,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "cxx": _cxx(),
    }


def differences(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[dict]:
    """``[{key, recorded, here, affects_bits}]`` for every entry that differs (an entry the
    manifest does not have counts as differing: an older manifest cannot promise identity)."""
    out = []
    recorded = recorded or {}
    for key in BIT_IDENTITY + INFORMATIONAL:
        was, now = recorded.get(key, "(not recorded)"), current.get(key)
        if was != now:
            out.append({"key": key, "recorded": was, "here": now, "affects_bits": key in BIT_IDENTITY})
    return out
