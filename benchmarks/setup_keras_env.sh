#!/usr/bin/env bash
# Build the throwaway Keras 3 + TensorFlow venv used by tests/fixtures/make_keras_fixture.py
# and benchmarks/keras_reference.py. It lives OUTSIDE the repo and never touches the
# project venv (.venv), which must stay free of Keras/TensorFlow.
#
# Usage: benchmarks/setup_keras_env.sh [VENV_PATH]   (default /tmp/kerasenv)
set -euo pipefail

venv="${1:-/tmp/kerasenv}"

python3 -m venv "$venv"
# The machine-wide pip constraint file (/etc/xdg/pip) only caps torch/torchvision, which
# this venv does not use; --isolated with an empty PIP_CONSTRAINT ignores it for this venv only.
# tensorflow-cpu is enough on a machine without a GPU; fall back to tensorflow if absent.
if ! PIP_CONSTRAINT= "$venv/bin/pip" install --isolated keras tensorflow-cpu h5py; then
    PIP_CONSTRAINT= "$venv/bin/pip" install --isolated keras tensorflow h5py
fi

"$venv/bin/python" -c 'import keras, tensorflow as tf, h5py; print("keras", keras.__version__, "tensorflow", tf.__version__, "h5py", h5py.__version__)'
