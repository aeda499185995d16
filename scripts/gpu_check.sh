#!/usr/bin/env bash
# The GPU checks of the training stage, as one script for a short lease of one GPU machine.
#
# Runs scripts/bench_train.py (the real training stack on random tokens: megatron GPTModel, DDP,
# megatron optimizer, bf16) for the 0.01 scales and prints tokens/s, TFLOP/s and MFU per run:
#   1. 1.7B at the recipe's micro-batch 4 × 4096, SDPA attention, no recompute   (the MFU figure)
#   2. the same with selective recompute                                          (recipe default)
#   3. the same with megatron's local attention + selective recompute             (SDPA vs local)
#   4-6. 1.3B, 0.4B, 0.13B at their micro-batch sizes                            (plan throughputs)
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
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
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
    rm -f "$out/$name.tmp"
    echo "$name: rc=$rc, $((SECONDS - started)) s"
    return $rc
}

bench 1.7b-sdpa --scale 1.7b --recompute none \
    || bench 1.7b-sdpa-mbs2 --scale 1.7b --recompute none --micro-batch-size 2
bench 1.7b-sdpa-selective --scale 1.7b --recompute selective
bench 1.7b-local-selective --scale 1.7b --recompute selective --attention local
bench 1.3b-sdpa --scale 1.3b --recompute none
bench 0.4b-sdpa --scale 0.4b --recompute none
bench 0.13b-sdpa --scale 0.13b --recompute none

python3 - "$out/summary.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'run':24} {'attn':6} {'mbs':>3} {'recompute':9} {'step_s':>7} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>6} loss")
for r in rows:
    print(f"{r['name']:24} {r['attention'][:6]:6} {r['micro_batch_size']:>3} {r['recompute']:9} {r['step_s']:7.3f} "
          f"{r['tokens_per_s']:9.0f} {r['tflops_per_device']:8.1f} {100 * (r['mfu'] or 0):5.1f}% {r['mem_gb'] or 0:6.1f} "
          f"{r['loss_first']:.3f}->{r['loss_last']:.3f}")
EOF
