#!/usr/bin/env bash
# Create a venv with DeePMD-kit (PyTorch backend, CPU) for the water benchmark and the
# equality tests of tests/test_interop.py.
#
# Usage: [PYTHON=python3.X] bench/deepmd/setup_venv.sh VENV_DIR
#
# PYTHON (default python3; the Makefile passes its own $(PYTHON)) must be Python 3.10-3.12,
# the versions deepmd-kit 3.2.0 and torch 2.13.0 both publish wheels for.
# Versions are pinned to those the venv on this machine was validated with, so two builds
# give the same venv. A lock (VENV_DIR.lock) serialises concurrent builds (two CI runs
# sharing the venv under ~/.cache) so neither sees a half-built venv.
#
# Idempotent: does nothing if VENV_DIR/bin/dp --pt -h already works and the PT backend imports.
# torch is pinned to 2.13.0 (the CPU wheel on this machine's disk) in every pip call so
# pip never pulls another torch. DeePMD-kit 3.2 beside torch 2.13.0 needs three workarounds
# (shared/reference/anchor-deepmd.md §1):
#   1. the PyPI `mpich` package (deepmd's PT backend loads libmpi from it);
#   2. rename deepmd/lib/libdeepmd_op_pt.so (built for torch 2.11; its version check aborts;
#      se_e2_a only uses those custom ops for compressed models);
#   3. e3nn>=0.5.9 (imported unconditionally by deepmd.pt).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
TORCH="torch==2.13.0"
DEEPMD="deepmd-kit==3.2.0"
ASE="ase==3.29.0"
MPICH="mpich==5.0.2"
E3NN="e3nn==0.6.0"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if ! flock -w "${DPELT_VENV_LOCK_TIMEOUT:-3600}" 9; then
    echo "ERROR: another build of $VENV holds $VENV.lock" >&2
    exit 1
fi

# `dp --pt -h` succeeds even when the PT backend cannot load (it only parses arguments),
# so "works" also means the PT entry point and the ASE calculator import.
dp_works() {
    [ -x "$VENV/bin/dp" ] && "$VENV/bin/dp" --pt -h >/dev/null 2>&1 &&
        "$VENV/bin/python" -c 'import deepmd.pt.entrypoints.main, deepmd.calculator' >/dev/null 2>&1
}

if dp_works; then
    echo "== $VENV/bin/dp already works; nothing to do"
    exit 0
fi

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "ERROR: PYTHON=$PY not found (give an interpreter: PYTHON=python3.11 make deepmd-venv)" >&2
    exit 2
fi
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$PYVER" in
    3.10 | 3.11 | 3.12) ;;
    *)
        echo "ERROR: $PY is Python $PYVER; deepmd-kit 3.2.0 with torch 2.13.0 needs Python 3.10-3.12 (give one: PYTHON=python3.11 make deepmd-venv)" >&2
        exit 2
        ;;
esac
echo "== creating venv $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

echo "== installing $TORCH, $DEEPMD, $ASE"
"${PIP[@]}" "$TORCH" "$DEEPMD" "$ASE"

echo "== workaround 1: mpich from PyPI"
"${PIP[@]}" "$TORCH" "$DEEPMD" "$MPICH"

echo "== workaround 2: disable deepmd's PyTorch custom-op library (built for another torch)"
LIBDIR=$("$VENV/bin/python" -c 'import deepmd, os; print(os.path.join(os.path.dirname(deepmd.__file__), "lib"))')
if [ -e "$LIBDIR/libdeepmd_op_pt.so" ]; then
    mv "$LIBDIR/libdeepmd_op_pt.so" "$LIBDIR/libdeepmd_op_pt.so.disabled"
    echo "   renamed $LIBDIR/libdeepmd_op_pt.so -> libdeepmd_op_pt.so.disabled"
else
    echo "   $LIBDIR/libdeepmd_op_pt.so not present (already renamed?)"
fi

echo "== workaround 3: $E3NN (>=0.5.9 needed)"
"${PIP[@]}" "$TORCH" "$DEEPMD" "$E3NN"

echo "== versions"
"$VENV/bin/python" -c 'import deepmd, torch, ase; print("deepmd-kit", deepmd.__version__, "| torch", torch.__version__, "| ase", ase.__version__)'

echo "== checking: $VENV/bin/dp --pt -h and import of the PT backend"
if ! dp_works; then
    "$VENV/bin/dp" --pt -h >/dev/null
    "$VENV/bin/python" -c 'import deepmd.pt.entrypoints.main, deepmd.calculator'
    echo "ERROR: the DeePMD-kit PyTorch backend does not work in $VENV" >&2
    exit 1
fi
echo "== OK: $VENV/bin/dp --pt works"
