"""``dpelt export`` / ``dpelt import``: DeePMD-kit model files (registered by :func:`add_interop_parsers`)."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_export(args: argparse.Namespace) -> None:
    from ..model.serialize import load_model
    from .deepmd_export import export_deepmd

    model = load_model(args.model)
    out = export_deepmd(model, args.output)
    d = model.config.descriptor
    print(
        f"wrote {out}: DeePMD-kit se_e2_a model, type_map {list(model.type_map)}, rcut {d.rcut}, sel {list(model.sel)}, "
        f"{model.dtype_name}; for DeePMD-kit's DeepPot / dp test / LAMMPS run `dp convert-backend {out} model.pth`"
    )


def _cmd_import(args: argparse.Namespace) -> None:
    from ..errors import ModelFileError
    from ..model.serialize import save_model
    from .deepmd_import import import_deepmd

    if not str(args.output).endswith(".pt"):
        raise ModelFileError("a dpelt model file is written with the suffix .pt", path=args.output)
    model = import_deepmd(args.model)
    save_model(model, model.config, args.output, metadata=model.metadata)
    d = model.config.descriptor
    print(
        f"wrote {args.output}: dpelt model from {args.model}, type_map {list(model.type_map)}, rcut {d.rcut}, "
        f"sel {list(model.sel)}, {model.dtype_name}"
    )


def add_interop_parsers(subparsers: Any) -> None:
    """Register ``dpelt export MODEL OUT`` and ``dpelt import MODEL OUT`` on an argparse subparsers object."""
    e = subparsers.add_parser(
        "export",
        help="write a dpelt model as a DeePMD-kit model (.dp or .yaml; then `dp convert-backend OUT model.pth` for LAMMPS)",
    )
    e.add_argument("model", help="dpelt model file (.pt)")
    e.add_argument("output", help="DeePMD-kit backend-independent model file: .dp (HDF5) or .yaml/.yml")
    e.set_defaults(func=_cmd_export)
    i = subparsers.add_parser("import", help="read a DeePMD-kit se_e2_a model (.dp, .yaml, frozen .pth) into a dpelt model file")
    i.add_argument("model", help="DeePMD-kit model: .dp, .yaml/.yml or a frozen PyTorch .pth")
    i.add_argument("output", help="dpelt model file to write (.pt)")
    i.set_defaults(func=_cmd_import)
