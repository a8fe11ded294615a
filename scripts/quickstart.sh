#!/usr/bin/env bash
# Set up (idempotent), build the built-in procedural data set, train the back-view LoRA on it
# (tiny debug model, 2 Ray workers x DeepSpeed ZeRO-2) and generate a back view with the LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
train=${2:-runs/train-backview-debug}
.venv/bin/know3d data build configs/quickstart.yaml --source procedural --output "$out"
.venv/bin/know3d data status --output "$out"
.venv/bin/know3d data review --output "$out" --num 48
.venv/bin/know3d train backview configs/backview_debug.yaml --shards "$out" --output "$train" --fresh
# a front view from the validation shards -> its generated back view
.venv/bin/python - "$out" "$train/front.png" <<'PY'
import sys
from pathlib import Path
from pipeline.shards import iter_samples
shard = sorted(Path(sys.argv[1]).glob("val-*.tar"))[0]
Path(sys.argv[2]).write_bytes(next(iter_samples([shard], fields=("front.png",)))["front.png"])
PY
.venv/bin/know3d generate backview --image "$train/front.png" --lora "$train/lora" --prompt "a handle" \
  --steps 8 --output "$train/back.png"
echo "contact sheet: $out/contact_sheet.png   annotations: $out/review.html"
echo "training: $train/metrics.jsonl, validation grids in $train/validation/, LoRA in $train/lora/"
echo "mlflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1"
