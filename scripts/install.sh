#!/usr/bin/env bash
# The project's Python install: the one source of truth for scripts/setup.sh (CI, workstations)
# and the Dockerfile (cluster image), so the install CI exercises is the one the image runs.
#   scripts/install.sh PYTHON [EXTRAS] [LOG]
# PYTHON: the interpreter of the target environment (a venv's python, or the image's);
# EXTRAS: pyproject extras (default torch,vlm,train,eval,dev); LOG: pip's output (default stdout).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: scripts/install.sh PYTHON [EXTRAS] [LOG]}
extras=${2:-torch,vlm,train,eval,dev}
log=${3:-/dev/stdout}
pip() {
  "$py" -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1 \
    || { echo "[install] pip install $* failed" >&2; [ "$log" = /dev/stdout ] || tail -30 "$log" >&2; exit 1; }
}
pip install -U pip
pip install -e ".[$extras]"
# DeepSpeed builds from an sdist that imports torch: no build isolation, no ahead-of-time ops.
DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
# pyrender pins PyOpenGL 3.1.0, which cannot drive OSMesa; 3.1.10 works for EGL and OSMesa.
# pip cannot resolve both in one install, so this is a second step.
pip install "PyOpenGL==3.1.10"
"$py" -c "import pyrender, ray, mlflow, webdataset, torch, transformers, diffusers, peft, deepspeed, timm, open_clip, fpsample, skimage, know3d.pipeline.cli" \
  || { echo "[install] install check failed" >&2; exit 1; }
