"""Seeds: every random choice of a run derives from the master seed and the job's identity.

``derive_seed(master, "train", 3, 1)`` is the seed of member 1's training in iteration 3.
It depends on nothing else (not time, not job order, not the number of cores), so the same
config gives the same random numbers wherever and in whatever order the jobs run.
"""

from __future__ import annotations

import hashlib


def derive_seed(master: int, *identity: object) -> int:
    """A 31-bit seed from the master seed and the job identity (rule, iteration, member, task …)."""
    text = "/".join([str(int(master))] + [str(p) for p in identity])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
