"""Process set-up shared by every compute step: threads, determinism, allocator.

* Thread count is fixed explicitly (floating-point results depend on it), never taken
  from the number of cores Snakemake grants.
* ``torch.use_deterministic_algorithms(True)``, without its filling of every newly allocated
  tensor with NaN (``fill_uninitialized_memory``, a debugging aid: ~300 extra passes per
  192-atom evaluation, 1-2 % of inference and training; results are bit-identical without).
* glibc's allocator returns large blocks to the OS by default, so every training step
  page-faults its ~10 MB activations again (15-20 % of a step here). Raising the mmap and
  trim thresholds keeps them in the heap (Linux/glibc only; a no-op elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


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
    if threads is None:
        threads = int(os.environ.get("DPELT_THREADS", torch.get_num_threads()))
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    if hasattr(torch.utils, "deterministic"):  # torch >= 2.1
        torch.utils.deterministic.fill_uninitialized_memory = False
    tune_malloc()
    return int(threads)
