#!/usr/bin/env bash
# Every GPU figure of docs/performance.md from one run of under 8 minutes on one H100, with no network:
#
#     bash benchmarks/gpu.sh                 # JSON, logs and gpu-table.md into benchmarks/results/
#     bash benchmarks/gpu.sh --out DIR       # ... into DIR
#     bash benchmarks/gpu.sh --dry-run       # (or DRY_RUN=1) the same commands on the CPU, tiny models
#
# Parts, in this order, each a benchmark script run with a time limit out of the whole budget
# (BUDGET_S, 470 s; a part with under 10 s left is skipped); a part that fails or runs out of time is
# recorded, and the next one runs:
#   sd15-setup    the SD1.5 layout with random weights, written once (benchmarks/random_weights.py);
#                 SDXL base's UNet (benchmarks/sdxl.py --rounds 0) is written meanwhile, in the background
#   sd15-fp16     ours against diffusers, fp16, eager, 512², 50 DDIM steps, cfg and negative, with
#                 each run's peak GPU memory (benchmarks/bench.py)
#   precision     fp16 and bf16 against fp32, each model and the image (benchmarks/precision.py)
#   vldnp-cost    VL-DNP against plain CFG, fp16, 50 steps, 10 queries, the cases of the CPU's quiet
#                 run and the latent proposer finding nothing, two rounds (benchmarks/vldnp_cost.py)
#   vae-decode    decode against decode_tiled at 512² and 1024², fp16: time and peak memory
#   sdxl-fp16     SDXL base's UNet at 1024² (128² latents, batch 2), ours against diffusers, fp16
#   sd15-compile  as sd15-fp16 with torch.compile (mode "default": max-autotune would take the whole
#                 budget to tune; the first run of each compiles, untimed), cfg only
# Then benchmarks/gpu_table.py turns the JSON into gpu-table.md, for docs/performance.md.
#
# The dry run (tests/test_benchmarks.py runs it) keeps every command and flag but the sizes and
# dtypes: tiny random models, 64² images, 3 steps, one round, on the CPU in fp32 (fp16 convolutions
# crawl on a CPU), one thread, time limits x10 (a shared CPU is slow; a dry run has no budget), the
# SD1.5 parts beside the others, and torch.compile turned off (TORCH_COMPILE_DISABLE): Inductor's C++
# compile of the tiny UNets takes minutes of CPU. tests/test_unet.py traces the UNet with TorchDynamo.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=${DRY_RUN:-0}
OUT=""
WORK=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --work) WORK=${2:?--work needs a folder}; shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (use --dry-run, --out DIR, --work DIR)" >&2; exit 2 ;;
    esac
    shift
done

# The cases of docs/performance.md's quiet CPU run of VL-DNP's cost, and the latent proposer's
VLDNP_CASES=cfg,three-branches,clip-nothing-taesd,clip-nothing-vae,stub-async-taesd,stub-async-vae,stub-taesd,latent-nothing
if [[ $DRY == 1 ]]; then
    OUT=${OUT:-$(mktemp -d)}
    WORK=${WORK:-$OUT/work}
    SD15=$WORK/sd15-tiny SDXL=$WORK/sdxl-unet-small
    export OMP_NUM_THREADS=1 TORCH_COMPILE_DISABLE=1
    DEVICE=cpu DTYPE=fp32 SIZE=64 STEPS=3 REPEATS=1 WARMUP=0 ROUNDS=1 COMPONENT_REPEATS=1 CAP_SCALE=10
    VAE_SIZES=64 VAE_TILE="--tile 4 --overlap 1" VAE_CONFIG=small
    SDXL_CONFIG=small LATENT=8 SDXL_STEPS=1 TINY=--tiny CLIP=small VLDNP_STEPS=5
else
    OUT=${OUT:-$ROOT/benchmarks/results}
    WORK=${WORK:-/tmp/gpu-bench}
    SD15=$WORK/sd15-random SDXL=$WORK/sdxl-unet
    DEVICE=cuda DTYPE=fp16 SIZE=512 STEPS=50 REPEATS=3 WARMUP=1 ROUNDS=2 COMPONENT_REPEATS=5 CAP_SCALE=1
    VAE_SIZES=512,1024 VAE_TILE="" VAE_CONFIG=sd
    SDXL_CONFIG=sdxl LATENT=128 SDXL_STEPS=5 TINY="" CLIP=vit-l14 VLDNP_STEPS=50
fi
if [[ $DRY != 1 ]] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch sees no CUDA device here; --dry-run runs the same commands on the CPU" >&2
    exit 2
fi

BUDGET_S=${BUDGET_S:-$((470 * CAP_SCALE))}
mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd -P)
RUNS=$OUT/gpu-runs.jsonl
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

START=$(date +%s)
say() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

record() {  # record PART RC SECONDS LIMIT COMMAND...: one JSON line per part
    python - "$RUNS" "$@" <<'EOF'
import json, sys
runs, part, rc, seconds, limit, *command = sys.argv[1:]
with open(runs, "a") as f:
    f.write(json.dumps(dict(part=part, rc=int(rc), seconds=int(seconds), limit_s=int(limit), command=command,
                            log=f"gpu-{part}.log")) + "\n")
EOF
}

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

part() {  # part NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds, within the budget
    local name=$1 cap=$(($2 * CAP_SCALE)) left limit t0 rc
    shift 2
    left=$(left)
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        say "$name: skipped, ${left}s of the budget left"
        record "$name" -1 0 "$limit" "$@"
        return
    fi
    say "$name: start, at most ${limit}s: $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/gpu-$name.log" 2>&1
    rc=$?
    record "$name" "$rc" $(($(date +%s) - t0)) "$limit" "$@"
    if ((rc == 0)); then
        say "$name: done in $(($(date +%s) - t0))s"
    else
        say "$name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ", out of time")); the end of gpu-$name.log:"
        tail -n 5 "$OUT/gpu-$name.log" | sed 's/^/    /'
    fi
}

: >"$RUNS"
rm -f "$OUT"/gpu-{sd15-fp16,sd15-compile,precision,vldnp-cost,vae-decode,sdxl-fp16}.json "$OUT/gpu-table.md"
say "$([[ $DRY == 1 ]] && echo "DRY RUN on the CPU, tiny models" || echo "on $DEVICE"): results in $OUT, weights in $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu-nvidia-smi.csv"

# SDXL base's UNet (9.6 GB of fp32) is written meanwhile by CPUs that the GPU parts leave idle.
SDXL_WRITER=""
if [[ ! -f $SDXL/config.json ]]; then
    part sdxl-setup 300 python benchmarks/sdxl.py --folder "$SDXL" --config "$SDXL_CONFIG" --rounds 0 &
    SDXL_WRITER=$!
fi
[[ -f $SD15/model_index.json ]] || part sd15-setup 150 python benchmarks/random_weights.py "$SD15" $TINY

sd15_parts() {
    part sd15-fp16 120 python benchmarks/bench.py --model "$SD15" --device $DEVICE --dtype $DTYPE --size $SIZE \
        --steps $STEPS --modes cfg,negative --repeats $REPEATS --warmup $WARMUP --json "$OUT/gpu-sd15-fp16.json"
    part precision 90 python benchmarks/precision.py --model "$SD15" --device $DEVICE --dtypes fp16,bf16 \
        --size $SIZE --steps $STEPS --warmup 2 --json "$OUT/gpu-precision.json"
    part vldnp-cost 120 python benchmarks/vldnp_cost.py --model "$SD15" --clip $CLIP --device $DEVICE \
        --dtype $DTYPE --size $SIZE --steps $VLDNP_STEPS --cases $VLDNP_CASES --rounds $ROUNDS \
        --component-repeats $COMPONENT_REPEATS --json "$OUT/gpu-vldnp-cost.json"
}

other_parts() {
    part vae-decode 60 python benchmarks/vae_decode.py --config $VAE_CONFIG --device $DEVICE --dtype $DTYPE \
        --sizes $VAE_SIZES $VAE_TILE --json "$OUT/gpu-vae-decode.json"
    if [[ -n $SDXL_WRITER ]] && kill -0 "$SDXL_WRITER" 2>/dev/null; then
        say "sdxl-setup: waiting for the SDXL UNet's folder"
        while kill -0 "$SDXL_WRITER" 2>/dev/null; do sleep 1; done
    fi
    part sdxl-fp16 120 python benchmarks/sdxl.py --folder "$SDXL" --device $DEVICE --impls fp16,diffusers-fp16 \
        --latent $LATENT --batch 2 --steps $SDXL_STEPS --rounds 1 --json "$OUT/gpu-sdxl-fp16.json"
    part sd15-compile 300 python benchmarks/bench.py --model "$SD15" --device $DEVICE --dtype $DTYPE --size $SIZE \
        --steps $STEPS --modes cfg --repeats $REPEATS --warmup 1 --compile --compile-mode default \
        --json "$OUT/gpu-sd15-compile.json"
}

if [[ $DRY == 1 ]]; then  # side by side on the CPU's cores: a dry run's times mean nothing
    sd15_parts &
    other_parts
else
    sd15_parts
    other_parts
fi
wait

python benchmarks/gpu_table.py "$OUT" >"$OUT/gpu-table.md"
rc=$?
say "the table ($OUT/gpu-table.md):"
cat "$OUT/gpu-table.md"
exit $rc
