#!/usr/bin/env bash
# Idempotent setup: system GL libraries (headless rendering), a virtualenv in .venv, the
# project and its pinned stack. Re-running is a no-op until pyproject.toml or this file change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

need_gl=0
for lib in libOSMesa.so libEGL_mesa.so libGL.so.1; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_gl=1
done
if [ "$need_gl" = 1 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "[setup] installing Mesa GL libraries (EGL + OSMesa) with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      libosmesa6 libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglx-mesa0 >/dev/null
  else
    echo "[setup] warning: Mesa GL libraries (libosmesa6, libegl-mesa0) not found; install them for rendering" >&2
  fi
fi

stamp=.venv/.know3d-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/know3d ]; then
  exit 0
fi
echo "[setup] creating .venv and installing the project (first time: ~3 min)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
: > "$log"
pip() {
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1 \
    || { echo "[setup] pip install $* failed; last lines of $log:" >&2; tail -30 "$log" >&2; exit 1; }
}
pip install -U pip
pip install -e ".[torch,vlm,train,eval,dev]"
# DeepSpeed builds from an sdist that imports torch: no build isolation, no ahead-of-time ops.
DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"
# pyrender pins PyOpenGL 3.1.0, which cannot drive OSMesa; 3.1.10 works for EGL and OSMesa.
# pip cannot resolve both in one install, so this is a second step.
pip install "PyOpenGL==3.1.10"
.venv/bin/python -c "import pyrender, ray, mlflow, webdataset, torch, transformers, diffusers, peft, deepspeed, timm, open_clip, fpsample, skimage, know3d.pipeline.cli" \
  || { echo "[setup] install check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done"
