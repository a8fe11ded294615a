#!/usr/bin/env bash
# The 3D generator's quickstart (Know3D §3.2) on the built-in procedural set, after setup:
#   back-view LoRA (reused when scripts/quickstart.sh already trained it) -> `geometry` data build
#   -> targets (occupancy + SS latent) -> hidden-state pre-pass (H and the ablation variants)
#   -> stage 1: a CPU-size base flow (stands in for TRELLIS.2's released one) -> Know3D LoRA + H
#   -> stage 2: shape targets (dual grid + shape SC-VAE latent) -> a CPU-size SLat-flow base ->
#      Know3D LoRA + H -> `know3d generate shapes` (front + prompt -> back view -> both stages ->
#      mesh from the decoded dual grid, HY3D-Bench layout) -> `know3d eval shapes` against the
#   assets' meshes -> the conditioning ablation table (hidden | vae_latent | dino_back | none)
#   -> a front-guided shape (the rendered front's depth + camera) and the guidance lambda sweep.
# Debug-size models memorize their 2 training assets on a CPU; the held-out ablation shows the
# commands and the table, not the paper's numbers (that needs the real models and data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
k=.venv/bin/know3d
qs=runs/quickstart; bv=runs/train-backview-debug; geo=runs/geo
$k data build configs/quickstart.yaml --source procedural --output "$qs"
$k train backview configs/backview_quickstart.yaml --shards "$qs" --output "$bv"
$k data build configs/quickstart.yaml --source procedural --output "$geo" --set render.profile=geometry
$k data targets --dataset "$geo"
$k data hidden-states --shards "$geo" --lora "$bv/lora" \
  --set hidden.model=debug:small-qwen-image-edit --set hidden.image_size=64 --set 'hidden.layers=[1,3]' \
  --set hidden.steps=8 --set hidden.cache_dir=runs/geo_hidden \
  --set 'hidden.variants=[hidden,vae_latent,dino_back]' --set hidden.dino=debug --set hidden.dino_resolution=64
$k train generator configs/generator_ss_debug_base.yaml --dataset "$geo"
$k train generator configs/generator_ss_debug.yaml --dataset "$geo"
# stage 2: shape latents (dual grid 64³ -> debug shape SC-VAE -> 16³ x 8), its base, the Know3D fine-tune
$k data targets --dataset "$geo" --stage shape --shape-vae debug
$k train generator configs/generator_shape_debug_base.yaml --dataset "$geo"
$k train generator configs/generator_shape_debug.yaml --dataset "$geo"
# shapes of the 2 training assets from their front views (+ a description), then HY3D-Bench geometry metrics
shapes=runs/generator-shapes
rm -rf "$shapes"
.venv/bin/python - "$geo" "$shapes" <<'PY'
import json, shutil, sys
from pathlib import Path
from know3d.training.generator.targets import _rendered_assets
geo, shapes = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads(Path("runs/train-generator-debug/generator/know3d_generator.json").read_text())
meshes = {a["sha256"]: Path(a["uri"]) for a in _rendered_assets(geo)}
from know3d.core.shards import iter_samples, resolve_shards
done = set()
for sample in iter_samples([Path(u) for u in resolve_shards([str(geo)], "train")[0]], fields=("front.png", "json")):
    key, info = sample["__key__"], json.loads(sample["json"])
    if key not in meta["trained_on"] or info["asset_id"] in done:
        continue
    done.add(info["asset_id"])
    uid = info["asset_id"][:16]
    for sub, write in (("image", lambda p: p.write_bytes(sample["front.png"])),
                       ("gt", lambda p: shutil.copyfile(meshes[info["asset_id"]], p))):
        path = shapes / sub / uid / ("000.png" if sub == "image" else "000" + meshes[info["asset_id"]].suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
PY
# front + prompt -> back view -> stage 1 -> stage 2 -> mesh, for every image, on Ray (HY3D-Bench layout)
.venv/bin/python -c "import json,pathlib,sys; print(json.dumps({p.parent.name: 'the back of the object' for p in pathlib.Path(sys.argv[1]).glob('*/000.png')}))" "$shapes/image" > "$shapes/prompts.json"
$k generate shapes --images "$shapes/image" --prompts "$shapes/prompts.json" --backview-lora "$bv/lora" \
  --generator runs/train-generator-debug/generator --shape-generator runs/train-generator-shape-debug/generator \
  --output "$shapes/pred"
$k eval shapes --pred "$shapes/pred" --images "$shapes/image" --gt "$shapes/gt" --output runs/eval-generator --no-semantic \
  --set mesh.allow_non_manifold=true  # dual-grid meshes have non-manifold edges even from true grids (benchmarks/RESULTS.md)
$k train ablation configs/generator_ss_debug.yaml --dataset "$geo" --output runs/ablation-debug --heldout 3
# front-partial guidance (Consistent3DGen): a rendered front view's depth + camera keep the visible side faithful
fronts=("$geo"/work/*/*/*/rgba/000.png); front=${fronts[0]}
$k generate shape --image "$front" --prompt "the back of the object" --backview-lora "$bv/lora" \
  --generator runs/train-generator-debug/generator --shape-generator runs/train-generator-shape-debug/generator \
  --front-guidance depth --guidance-lambda 4 --output runs/generator-front-guided
# its lambda curve on 3 assets neither generator was trained on: front consistency, IoU / Chamfer
$k eval guidance-sweep --dataset "$geo" --split all --heldout 3 --lambdas 1,4,16 --backview-lora "$bv/lora" \
  --generator runs/train-generator-debug/generator --shape-generator runs/train-generator-shape-debug/generator \
  --output runs/guidance-sweep-debug
echo "generators: runs/train-generator-debug/generator (stage 1), runs/train-generator-shape-debug/generator (stage 2)"
echo "shapes: $shapes/pred/<uid>/000.glb (+ work/: back.png, occupancy.npz, shape.json)   evaluation: runs/eval-generator/report.html"
echo "ablation: runs/ablation-debug/ablation.md"
echo "front-guided shape: runs/generator-front-guided/mesh.glb   lambda sweep: runs/guidance-sweep-debug/guidance_sweep.md"
