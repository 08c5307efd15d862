#!/usr/bin/env bash
# Install what boxlevelset-napari needs on a fresh Debian/Ubuntu machine: the system
# libraries Qt and napari's OpenGL canvas need (Xvfb + Mesa for headless use), the CPU
# build of torch (a CUDA machine can install its own torch first), and the project.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth libgl1 libgl1-mesa-dri \
    libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
    libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
    libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[all,test]"
