#!/usr/bin/env bash
# Set up (idempotent), build the built-in procedural data set, train the back-view LoRA on it
# (tiny debug model, 2 Ray workers x DeepSpeed ZeRO-2), generate a back view with the LoRA and
# evaluate: back views (PSNR/SSIM) and shapes (CD, F-score, NC, IoU on the procedural meshes with
# known perturbations as fake predictions; ULIP/Uni3D need checkpoints, so --no-semantic here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
train=${2:-runs/train-backview-debug}
.venv/bin/know3d data build configs/quickstart.yaml --source procedural --output "$out"
.venv/bin/know3d data status --output "$out"
.venv/bin/know3d data review --output "$out" --num 48
.venv/bin/know3d train backview configs/backview_debug.yaml --shards "$out" --output "$train" --fresh
# a front view from the validation shards -> its generated back view, in the benchmark layout
# (<dir>/<uid>/000.png) next to the true back view
bv="$train/backviews"
uid=$(.venv/bin/python - "$out" "$bv" <<'PY'
import sys
from pathlib import Path
from pipeline.shards import iter_samples
shard = sorted(Path(sys.argv[1]).glob("val-*.tar"))[0]
sample = next(iter_samples([shard], fields=("front.png", "back.png")))
uid = sample["__key__"].replace("/", "_")
for sub, field in (("front", "front.png"), ("gt", "back.png")):
    (Path(sys.argv[2]) / sub / uid).mkdir(parents=True, exist_ok=True)
    (Path(sys.argv[2]) / sub / uid / "000.png").write_bytes(sample[field])
print(uid)
PY
)
mkdir -p "$bv/pred/$uid"
.venv/bin/know3d generate backview --image "$bv/front/$uid/000.png" --lora "$train/lora" --prompt "a handle" \
  --steps 8 --output "$bv/pred/$uid/000.png"
.venv/bin/know3d eval backviews --pred "$bv/pred" --gt "$bv/gt" --images "$bv/front" --output runs/eval-backviews
# shape metrics: procedural meshes as GT, perturbed copies as "predictions" (+1 broken, 1 missing)
.venv/bin/python -m evaluation.demo --meshes "$out/procedural" --output runs/eval-demo --limit 10
.venv/bin/know3d eval shapes --pred runs/eval-demo/pred --images runs/eval-demo/image --gt runs/eval-demo/gt \
  --output runs/eval-shapes --no-semantic
echo "contact sheet: $out/contact_sheet.png   annotations: $out/review.html"
echo "training: $train/metrics.jsonl, validation grids in $train/validation/, LoRA in $train/lora/"
echo "evaluation: runs/eval-shapes/report.html, runs/eval-backviews/report.html"
echo "mlflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1"
