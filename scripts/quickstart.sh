#!/usr/bin/env bash
# Set up (idempotent) and build the built-in procedural data set end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
.venv/bin/know3d data build configs/quickstart.yaml --source procedural --output "$out"
.venv/bin/know3d data status --output "$out"
.venv/bin/know3d data review --output "$out" --num 48
echo "contact sheet: $out/contact_sheet.png   annotations: $out/review.html"
echo "mlflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1"
