#!/usr/bin/env bash
# Every GPU check of the project in one run (< 5 min on one H200, no internet; issue 18). Prints the
# figures benchmarks/RESULTS.md records:
#   1. the full-size Qwen-Image-Edit-2511 MMDiT (random weights, bf16) back-view LoRA step:
#      s/step, samples/s and peak GiB for micro-batch 1 and 4, fp32 and bf16 LoRA weights;
#   2. EGL rendering on the GPU (pyrender, headless, no X11): GL-only and end-to-end views/s per
#      actor at 512² with the threaded PNG writer, and the encode ratio against the former path;
#   3. `torchrun` + DeepSpeed ZeRO-2 + bf16 on CUDA with the debug back-view model, on shards this
#      script renders and writes itself (procedural assets, no Ray, no download);
#   4. `know3d train backview configs/backview_throughput.yaml` on those shards: the full-size MMDiT
#      (random weights) through the product's own command (Ray Train, latent-cache pre-pass,
#      DeepSpeed bf16, micro-batch 4): samples/s per GPU of the last logging window.
# Usage (from the repository root, the project importable: `pip install -e .` or PYTHONPATH):
#   bash benchmarks/gpu_check.sh [OUT]          OUT: scratch folder (default /tmp/know3d-gpu-check)
# Environment: PYTHON (default python3), SKIP="step ..." (mmdit render torchrun trainer), SIZE=debug for a
# CPU smoke run of the same script.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${1:-/tmp/know3d-gpu-check}
size=${SIZE:-full}
mkdir -p "$out"
export PYGLET_HEADLESS=1 PYOPENGL_PLATFORM=egl MLFLOW_TRACKING_URI="file://$out/mlruns" RAY_USAGE_STATS_ENABLED=0
status=0
run() {  # run NAME TIMEOUT CMD...: a failing check is reported, the others still run
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

if [ "$size" = debug ]; then
  run mmdit 120 $PY benchmarks/backview_gpu_step.py --size debug --resolution 64 --micro-batch 1,2 --steps 2 --warmup 1
else
  run mmdit 150 $PY benchmarks/backview_gpu_step.py --size full --resolution 512 --micro-batch 1,4 --lora-dtype fp32,bf16 --steps 4 --warmup 2
fi

# procedural assets and a tiny shard set (rendered on the GPU through EGL; the same code as the build)
res=$([ "$size" = debug ] && echo 64 || echo 512)
run shards 120 $PY benchmarks/check_shards.py "$out" "$res"
run render 90 $PY benchmarks/bench_render.py "$out/assets" --backend egl --cores 1 --repeats 1 --resolution "$res"
run encode 90 $PY benchmarks/bench_encode.py "$out/assets" --backend egl --threads 4 --repeats 1 --resolution "$res"

# torchrun on CUDA (NCCL, bf16, ZeRO-2) with the debug model on those shards
run torchrun 150 $PY -m torch.distributed.run --nproc_per_node 1 -m know3d.training.backview_train \
  configs/backview_debug.yaml --set "data.shards=[\"$out/shards\"]" --set mlflow.enabled=false \
  --set "output=$out/train" --set schedule.max_steps=8 --set schedule.validate_every=4
[ -f "$out/train/metrics.jsonl" ] && tail -n 2 "$out/train/metrics.jsonl"

# the full-size step through `know3d train backview` (SIZE=debug: the tiny model, fp32, on the CPU)
know3d=$(dirname "$(command -v "$PY")")/know3d
[ -x "$know3d" ] || know3d="$PY -m know3d.pipeline.cli"
if [ "$size" = debug ]; then
  run trainer 240 $know3d train backview configs/backview_throughput.yaml --shards "$out/shards" --output "$out/throughput" \
    --fresh --set model.name=debug:tiny-qwen-image-edit --set model.dtype=float32 --set data.image_size=64 \
    --set 'deepspeed.bf16="off"' --set 'ray.use_gpu="off"' --set lora.rank=4 --set schedule.max_steps=4
else
  run trainer 240 $know3d train backview configs/backview_throughput.yaml --shards "$out/shards" --output "$out/throughput" --fresh
fi
[ -f "$out/throughput/metrics.jsonl" ] && tail -n 1 "$out/throughput/metrics.jsonl"
exit $status
