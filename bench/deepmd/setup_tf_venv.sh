#!/usr/bin/env bash
# Create a Python 3.11 venv with DeePMD-kit's TensorFlow backend (CPU) for the water benchmark:
# the fastest DeePMD-kit on CPUs (and the only backend here that can `dp compress`).
#
# Usage: bench/deepmd/setup_tf_venv.sh VENV_DIR        (this machine: /root/.cache/dpelt/deepmd-tf-venv)
#
# Idempotent: does nothing if VENV_DIR's TF backend, its custom ops (needed by `dp compress` and
# compressed models) and the ASE calculator already import. Versions are pinned: the figures in
# bench/results/water.json were taken with deepmd-kit 3.2.0 + tensorflow-cpu 2.21.0.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
PINS=("deepmd-kit[cpu]==3.2.0" "tensorflow-cpu==2.21.0" ase)

# `dp --tf -h` only parses arguments, so "works" also means the custom op library loads.
dp_works() {
    [ -x "$VENV/bin/dp" ] && "$VENV/bin/dp" --tf -h >/dev/null 2>&1 &&
        "$VENV/bin/python" -c 'from deepmd.tf.env import op_module; import deepmd.calculator' >/dev/null 2>&1
}

if dp_works; then
    echo "== $VENV/bin/dp --tf already works; nothing to do"
    exit 0
fi

PY=${PYTHON:-python3.11}
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating venv $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
echo "== installing ${PINS[*]}"
"$VENV/bin/python" -m pip install --disable-pip-version-check "${PINS[@]}"

echo "== versions"
"$VENV/bin/python" -c 'import deepmd, tensorflow as tf, ase; print("deepmd-kit", deepmd.__version__, "| tensorflow", tf.__version__, "| ase", ase.__version__)'

echo "== checking: $VENV/bin/dp --tf -h and the TF custom ops"
if ! dp_works; then
    "$VENV/bin/dp" --tf -h >/dev/null
    "$VENV/bin/python" -c 'from deepmd.tf.env import op_module; import deepmd.calculator'
    echo "ERROR: the DeePMD-kit TensorFlow backend does not work in $VENV" >&2
    exit 1
fi
echo "== OK: $VENV/bin/dp --tf works"
