"""Frames: xarray schema, NetCDF storage, deepmd/npy and ASE formats (DESIGN §3)."""

from .frames import (  # noqa: F401
    LABELS,
    PROVENANCE,
    concat_frames,
    formula,
    frame_ids,
    has_labels,
    make_frames,
    natoms,
    nframes,
    remap_types,
    type_map_of,
    validate_frames,
)
from .io import read_systems, write_systems  # noqa: F401
