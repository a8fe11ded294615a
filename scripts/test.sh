#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two pytest-xdist workers, one per core (tests/conftest.py gives each one thread); override with
# KNOW3D_TEST_WORKERS=0 for a single process
exec .venv/bin/python -m pytest -q --durations=30 -n "${KNOW3D_TEST_WORKERS:-2}" "$@"
