#!/usr/bin/env bash
# The GPU checks of the training stage, as one unattended script for a short lease of one GPU
# (at most ~9 minutes: GPU_CHECK_BUDGET_S, default 480 s of runs after the set-up; run it with a
# 580 s limit).
#
# Runs scripts/bench_train.py (the real training stack: megatron GPTModel, DDP, megatron
# optimizer, bf16; no Transformer Engine needed) and writes every result the moment it is
# measured, so a timeout still leaves them:
#   OUTDIR/device.txt        card, driver, Python, torch, CUDA, cuDNN, megatron-core, TE present or not
#   OUTDIR/results.jsonl     one JSON line per variant and scale (bench_train.py --out)
#   OUTDIR/<step>.log        each step's full output (its table at the end)
#   OUTDIR/summary.txt       all rows side by side (also printed)
# Steps, in order of importance; each has its own time limit, cut to what is left of the budget:
#   1. 1.7B, micro-batch 4 × 4096 (halved on out-of-memory), variants all / plain / megatron, no
#      recompute: tokens/s, TFLOP/s and MFU (full-square and causal FLOP counts), peak memory,
#      optimizer state and the memory with it sharded as on the 252-GPU cluster; one profiled step
#      per variant records which attention kernels ran (cuDNN / Flash).
#   2. Numerics on the GPU: 0.13B on the demo corpus, dropout off, 20 steps from the same weights,
#      plain, all, plain again: the largest relative loss difference per step of `all` against the
#      first plain run, next to that of the second plain run (the GPU's own run-to-run bf16 noise).
#   3. 1.3B, 0.4B, 0.13B at the recipe micro-batch (4, 10, 12; halved on out-of-memory), all kernels.
# First lease (2026-11-27, H100 80GB HBM3, torch 2.11.0+cu130, no TE, before osref/kernels.py):
# 1.7B micro-batch 2: 0.410 s/step, 19 991 tokens/s, 254 TFLOP/s, 25.7 % MFU, 59 GB; 4 ran out of memory.
#
# Usage (repository root of the GPU machine; python3 there has torch with CUDA):
#     bash scripts/gpu_check.sh OUTDIR        # default OUTDIR: $OUT, else /tmp/gpu_check
# Wheels the machine lacks (megatron-core, jsonschema & co., tokenizers, zstandard) lie in .whl/
# (`bash scripts/gpu_wheels.sh` fetches them beforehand, 13 MB; carry .whl to the GPU machine);
# they are installed into /tmp/site first.
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
budget=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/osref-inductor}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 - <<'EOF'
import importlib.util, sys, torch, megatron.core as m
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| megatron-core", m.__version__,
      "| transformer_engine", "present" if importlib.util.find_spec("transformer_engine") else "absent",
      "| triton", "present" if importlib.util.find_spec("triton") else "absent")
EOF
} >"$out/device.txt" 2>&1
cat "$out/device.txt"
started=$SECONDS

# step NAME LIMIT_S ARGS...: one bench_train.py process, its rows appended to results.jsonl
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 60 ]; then
        echo "$name: skipped (${left} s of the budget left)" | tee -a "$out/skipped.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" \
        python3 scripts/bench_train.py --out "$out/results.jsonl" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/steps.txt"
    tail -n 12 "$out/$name.log"
}

step 1.7b 270 --scale 1.7b --variants all,plain,megatron --micro-batch-size 4 --fit --recompute none \
    --steps 8 --warmup-steps 3 --profile
step numerics 130 --scale 0.13b --variants plain,all,plain --data demo --no-dropout --steps 20 --warmup-steps 0 \
    --micro-batch-size 4 --recompute none
step 1.3b 80 --scale 1.3b --variants all --fit --recompute none --steps 5 --warmup-steps 2
step 0.4b 70 --scale 0.4b --variants all --fit --recompute none --steps 5 --warmup-steps 2
step 0.13b 60 --scale 0.13b --variants all --fit --recompute none --steps 5 --warmup-steps 2

python3 - "$out/results.jsonl" <<'EOF' | tee "$out/summary.txt"
import json, sys
sys.path.insert(0, "scripts")
from bench_train import format_table
try:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
except FileNotFoundError:
    rows = []
print(format_table(rows) if rows else "no results")
EOF
