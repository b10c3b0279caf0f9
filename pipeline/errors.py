"""Errors that name the file and the key at fault.

Every bad input (config, data file, model file) raises a :class:`DpeltError` whose
message starts with the file and the key, so the CLI can print one line instead of a
traceback.
"""

from __future__ import annotations

import os


class DpeltError(Exception):
    """A user-facing error: the message says which file and which key are wrong."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.key = key
        self.message = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if key is not None:
            where.append(f"[{key}]")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DataError(DpeltError):
    """A data file (NetCDF, deepmd/npy, extxyz) is malformed."""


class ConfigError(DpeltError):
    """A configuration key is missing, unknown or has a bad value."""


class ModelFileError(DpeltError):
    """A model or checkpoint file cannot be used."""


class NeighborOverflowError(DpeltError):
    """More neighbours of a type within ``rcut`` than ``sel`` allows."""


class TooManyNeighborsError(DpeltError):
    """A cut-off that would put an absurd number of atoms around each atom (rcut or cell wrong)."""
