#!/usr/bin/env bash
# Lint and format check (ruff, pinned in pyproject's dev extra). `--fix` rewrites in place.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check . --fix
  exec .venv/bin/ruff format .
fi
.venv/bin/ruff check .
exec .venv/bin/ruff format --check .
