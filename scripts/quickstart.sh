#!/usr/bin/env bash
# Set up (idempotent) and build the built-in procedural data set end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
.venv/bin/know3d data build configs/quickstart.yaml --source procedural --output "$out"
.venv/bin/know3d data status --output "$out"
echo "contact sheet: $out/contact_sheet.png   mlflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db"
