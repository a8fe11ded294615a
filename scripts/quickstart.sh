#!/usr/bin/env bash
# Set up (idempotent), build the built-in procedural data set, train the back-view LoRA on it
# (the learning-capable debug model memorizing 4 pairs, 2 Ray workers x DeepSpeed ZeRO-2),
# generate those pairs' back views with the exported LoRA and evaluate: back views (PSNR/SSIM)
# and shapes (CD, F-score, NC, IoU on the procedural meshes with
# known perturbations as fake predictions; ULIP/Uni3D need checkpoints, so --no-semantic here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/quickstart}
train=${2:-runs/train-backview-debug}
.venv/bin/know3d data build configs/quickstart.yaml --source procedural --output "$out"
.venv/bin/know3d data status --dataset "$out"
.venv/bin/know3d data review --dataset "$out" --num 48
.venv/bin/know3d train backview configs/backview_quickstart.yaml --shards "$out" --output "$train" --fresh
# the pairs the LoRA memorized -> their generated back views, in the evaluation layout
# (<dir>/<uid>/000.png) beside the true back views and the fronts, at the model's resolution
bv="$train/backviews"
rm -rf "$bv"
.venv/bin/python - "$out" "$train" "$bv" <<'PY'
import json, sys
from pathlib import Path
from know3d.core.shards import iter_samples
from know3d.core.shards import resolve_shards
from know3d.training.data import decode_image
from know3d.training.edit_model import to_pil
out, train, bv = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
meta = json.loads((train / "lora" / "know3d_lora.json").read_text())
keys, size = set(meta["trained_on"]), meta["image_size"]
for sample in iter_samples(resolve_shards([out], "train")[0], fields=("front.png", "back.png")):
    if sample["__key__"] in keys:
        uid = sample["__key__"].replace("/", "_")
        (bv / "inputs").mkdir(parents=True, exist_ok=True)
        to_pil(decode_image(sample["front.png"], size)).save(bv / "inputs" / f"{uid}.png")
        for sub, field in (("front", "front.png"), ("gt", "back.png")):
            (bv / sub / uid).mkdir(parents=True, exist_ok=True)
            to_pil(decode_image(sample[field], size)).save(bv / sub / uid / "000.png")
PY
.venv/bin/know3d generate backview --lora "$train/lora" --steps 12 --cfg-scale 1 --output "$bv/generated" \
  $(for f in "$bv"/inputs/*.png; do printf -- '--image %s ' "$f"; done)
for f in "$bv"/generated/*.png; do
  uid=$(basename "$f" .png); mkdir -p "$bv/pred/$uid"; mv "$f" "$bv/pred/$uid/000.png"
done
.venv/bin/know3d eval backviews --pred "$bv/pred" --gt "$bv/gt" --images "$bv/front" --model "$train/lora" \
  --output runs/eval-backviews
# shape metrics: procedural meshes as GT, perturbed copies as "predictions" (+1 broken, 1 missing)
.venv/bin/python -m know3d.evaluation.demo --meshes "$out/procedural" --output runs/eval-demo --limit 10
.venv/bin/know3d eval shapes --pred runs/eval-demo/pred --images runs/eval-demo/image --gt runs/eval-demo/gt \
  --output runs/eval-shapes --no-semantic
echo "contact sheet: $out/contact_sheet.png   annotations: $out/review.html"
echo "training: $train/metrics.jsonl, validation grids in $train/validation/, LoRA in $train/lora/"
echo "back views (pairs the LoRA was trained on): $bv/pred/*/000.png vs $bv/gt/*/000.png"
echo "evaluation: runs/eval-shapes/report.html, runs/eval-backviews/report.html"
echo "mlflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1"
