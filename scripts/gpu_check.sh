#!/usr/bin/env bash
# The GPU checks of the training stage, as one script for a short lease of one GPU machine.
#
# Runs scripts/bench_train.py (the real training stack on random tokens: megatron GPTModel, DDP,
# megatron optimizer, bf16) for the 0.01 scales and prints tokens/s, TFLOP/s and MFU per run.
# A single GPU holds the whole (unsharded) optimizer state, so the recipe's micro-batch may not
# fit: each scale starts at the given micro-batch and halves it after an out-of-memory failure.
#   1. 1.7B, SDPA attention, no recompute                          (the MFU figure of issue 4)
#   2. 1.7B with selective recompute, and with megatron's local attention (SDPA vs local)
#   3. 1.3B, 0.4B, 0.13B                                            (plan throughputs)
# First lease (2026-11-27, H100 80GB HBM3, torch 2.11.0+cu130, no TE): 1.7B at micro-batch 4 ran
# out of memory; micro-batch 2: 0.410 s/step, 19 991 tokens/s, 254 TFLOP/s, 25.7 % MFU, 59 GB.
#
# Usage (repository root of the GPU machine; python3 there has torch with CUDA):
#     bash scripts/gpu_check.sh OUTDIR        # default OUTDIR: $OUT, else /tmp/gpu_check
# Wheels the machine lacks (megatron-core, jsonschema & co. for Python 3.12) may lie in .whl/;
# they are installed into /tmp/site first. Each run has its own time limit, so one hang costs
# one line of the table, not the lease. Output: OUTDIR/bench.log (all runs), OUTDIR/summary.jsonl.
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
: >"$out/summary.jsonl"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)"
} 2>&1 | tee "$out/bench.log"

bench() {
    local name=$1
    shift
    local started=$SECONDS
    echo "=== $name: bench_train.py $*" >>"$out/bench.log"
    timeout 120 python3 scripts/bench_train.py --json --steps 10 --warmup-steps 3 "$@" >"$out/$name.tmp" 2>&1
    local rc=$?
    cat "$out/$name.tmp" >>"$out/bench.log"
    tail -n 1 "$out/$name.tmp" | grep '^{' | python3 -c "import json,sys; r=json.load(sys.stdin); r['name']='$name'; print(json.dumps(r))" >>"$out/summary.jsonl"
    mv "$out/$name.tmp" "$out/last_run.log"
    echo "$name: rc=$rc, $((SECONDS - started)) s"
    return $rc
}

# bench_fitting NAME MICRO_BATCH ARGS...: the largest of MICRO_BATCH, /2, /4 that runs
bench_fitting() {
    local name=$1 mbs=$2
    shift 2
    while [ "$mbs" -ge 1 ]; do
        bench "$name-mbs$mbs" --micro-batch-size "$mbs" "$@" && return 0
        grep -q "out of memory\|ncclUnhandledCudaError" "$out/last_run.log" || return 1
        mbs=$((mbs / 2))
    done
}

bench_fitting 1.7b-sdpa 2 --scale 1.7b --recompute none
bench_fitting 1.7b-sdpa-selective 4 --scale 1.7b --recompute selective
bench_fitting 1.7b-local-selective 2 --scale 1.7b --recompute selective --attention local
bench_fitting 1.3b-sdpa 2 --scale 1.3b --recompute none
bench_fitting 0.4b-sdpa 4 --scale 0.4b --recompute none
bench_fitting 0.13b-sdpa 8 --scale 0.13b --recompute none

python3 - "$out/summary.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'run':24} {'attn':6} {'mbs':>3} {'recompute':9} {'step_s':>7} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>6} loss")
for r in rows:
    print(f"{r['name']:24} {r['attention'][:6]:6} {r['micro_batch_size']:>3} {r['recompute']:9} {r['step_s']:7.3f} "
          f"{r['tokens_per_s']:9.0f} {r['tflops_per_device']:8.1f} {100 * (r['mfu'] or 0):5.1f}% {r['mem_gb'] or 0:6.1f} "
          f"{r['loss_first']:.3f}->{r['loss_last']:.3f}")
EOF
