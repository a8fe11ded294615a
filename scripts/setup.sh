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
    # shellcheck disable=SC2046 - one package per line, comments dropped
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $(grep -v '^#' scripts/apt-packages.txt) >/dev/null
  else
    echo "[setup] warning: Mesa GL libraries (libosmesa6, libegl-mesa0) not found; install them for rendering" >&2
  fi
fi

stamp=.venv/.know3d-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/know3d ]; then
  exit 0
fi
echo "[setup] creating .venv and installing the project (first time: ~3 min)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
: > "$log"
bash scripts/install.sh .venv/bin/python "torch,vlm,train,eval,dev" "$log"
echo "$want" > "$stamp"
echo "[setup] done"
