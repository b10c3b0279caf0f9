"""Process set-up shared by every compute step: OpenMP waiting, threads, determinism, allocator.

* **OpenMP threads sleep when they wait** (``OMP_WAIT_POLICY=PASSIVE``). torch's CPU wheels run
  their parallel regions on GNU OpenMP, whose default is to spin ~300 000 times at every barrier
  before sleeping. Alone on its cores that saves a wake-up; beside other jobs (``snakemake
  --cores N`` with many jobs, a shared node) a thread spins on a core while the thread it waits
  for has been descheduled, so a job loses far more than its share of the CPU
  (bench/oversubscription.py measures both policies under load). libgomp reads
  the policy once, when it is loaded (that is, when torch is imported), so it is put into the
  environment when this module is imported -- :mod:`pipeline` imports it first, before any
  submodule can import torch -- and job processes' children inherit it. A value set by the user
  (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) is kept.
* Thread count is fixed explicitly (floating-point results depend on it), never taken
  from the number of cores Snakemake grants; more threads than CPUs this process may run on
  (``os.sched_getaffinity``) is allowed but warned about: it is always a slowdown.
* ``torch.use_deterministic_algorithms(True)``, without its filling of every newly allocated
  tensor with NaN (``fill_uninitialized_memory``, a debugging aid: ~300 extra passes per
  192-atom evaluation, 1-2 % of inference and training; results are bit-identical without).
* glibc's allocator returns large blocks to the OS by default, so every training step
  page-faults its ~10 MB activations again (15-20 % of a step here). Raising the mmap and
  trim thresholds keeps them in the heap (Linux/glibc only; a no-op elsewhere).

This module must not import torch at import time (see above); torch is imported by the functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

#: environment given to the OpenMP runtime of every dpelt process (unless already set)
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
#: variables that, when set by the user, already decide how OpenMP threads wait
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def set_openmp_environment(environ: dict | None = None) -> dict:
    """Put :data:`OPENMP_ENV` into ``environ`` (default ``os.environ``) unless the user chose a
    wait policy. Returns what was added. Effective only before the OpenMP runtime is loaded
    (``import torch``); later it still reaches child processes."""
    env = os.environ if environ is None else environ
    if any(k in env for k in _WAIT_VARIABLES):
        return {}
    env.update(OPENMP_ENV)
    return dict(OPENMP_ENV)


#: True when the wait policy was in the environment before torch (hence libgomp) was loaded
OPENMP_ENV_BEFORE_TORCH = "torch" not in sys.modules
set_openmp_environment()


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask; a cluster job's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap (glibc). Returns True when applied."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    name = ctypes.util.find_library("c")
    if not name or os.environ.get("DPELT_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _malloc_tuned = ok
    return ok


def configure_torch(threads: int | None = None) -> int:
    """Fix intra-op threads (argument, else $DPELT_THREADS, else torch's default), enable
    deterministic algorithms and tune the allocator. Returns the thread count."""
    import torch

    if threads is None:
        threads = int(os.environ.get("DPELT_THREADS", torch.get_num_threads()))
    if int(threads) > cpus_available():
        warnings.warn(f"{threads} threads on {cpus_available()} available CPUs: the threads share cores (slower, same results)", stacklevel=2)
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    if hasattr(torch.utils, "deterministic"):  # torch >= 2.1
        torch.utils.deterministic.fill_uninitialized_memory = False
    tune_malloc()
    return int(threads)
