#!/usr/bin/env bash
# The GPU benchmark, one script for a device machine (no extra wheels needed: trb's bench path
# imports neither hydra nor wandb nor math-verify). Randomly initialised Qwen3-0.6B + Qwen3-4B
# shapes in bf16 (speed does not depend on the weights; acceptance rates do, so take those from
# the real-weights CPU pair). Writes json under $OUT (or benchmarks/results).
#   bash benchmarks/gpu.sh                       # on the device
#   PAIR=toy DEVICE=cpu BATCH=8 bash benchmarks/gpu.sh   # a dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
pair=${PAIR:-gpu-0.6b-4b}
device=${DEVICE:-cuda}
batch=${BATCH:-64}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m trb bench rollout --pair "$pair" --device "$device" --batch "$batch" --n 1,4 \
  --modes student,teacher,blend,spec2,spec4,fast,generate --new-tokens 128 --repeats 2 \
  --out "$out/rollout_$pair.json"
# static caches + one compiled (CUDA-graphed, mode=reduce-overhead) forward per model and shape,
# against HF's own static-cache compiled generate
python3 -m trb bench rollout --pair "$pair" --device "$device" --batch "$batch" --n 1 \
  --modes student,teacher,blend,fast,generate --new-tokens 128 --repeats 2 --compile-step \
  --out "$out/rollout_${pair}_compiled.json"
python3 -m trb bench train --pair "$pair" --device "$device" --batch "$batch" --new-tokens 256 \
  --repeats 2 --out "$out/train_$pair.json"
