#!/usr/bin/env bash
# The CUDA path of cct, proven on a lent GPU in one prepared run of under 5 minutes (issue 17).
#
# Stages, in priority order, each under its own timeout (a process group, SIGTERM then SIGKILL 10 s later)
# and all under one budget (--budget, 285 s):
#   setup        nvidia-smi, `python3 -m pip install --no-deps --no-build-isolation -e .`, torch sees CUDA
#   cuda_tests   pytest -m cuda tests/test_cuda.py (parity, bf16/fp16 steps, resume, eval/predict/export)
#   train_keras  cct train cct_2_3x2_32_keras, keras recipe, 1 epoch, on the carried JPEG CIFAR-10
#   train_paper  cct train cct_7_3x1_32, paper recipe, 300 steps (12,800 images x 3 epochs)
#   torchrun     the same under `torchrun --standalone --nproc_per_node 1` (nccl), 50 steps
#   bench        cct bench --device cuda --precision bf16 for both models at batches 128/512/2048,
#                with the bf16 GEMM peak (8192^3) measured on the spot: img/s, share of peak, batch to fill
#   official     the official SHI-Labs cct_7_3x1_32 under bf16 autocast, if its code was carried
# After each stage $OUT/summary.json is rewritten (atomically); the stages' output goes to
# $OUT/gpu_check.log, the sweeps' raw figures to $OUT/bench.json and $OUT/official.json: 4 files.
#
# Usage:
#   benchmarks/gpu_check.sh --prepare [--official PATH]   on the CPU machine: fill the git-ignored gpu_carry/
#       with ../shared/data/cifar10-jpeg.tar.gz (or $CCT_CIFAR_JPEG) and, with --official, the src/ package
#       of a SHI-Labs/Compact-Transformers checkout or bare git directory (never committed)
#   benchmarks/gpu_check.sh                               on the GPU machine (device tool: carry ["gpu_carry"],
#       command `bash benchmarks/gpu_check.sh`, timeout_s 330)
#   benchmarks/gpu_check.sh --dry-run                     on a CPU: every stage with --device cpu, tiny sizes and
#       a generated image tree, the summary in a temporary $OUT (or $OUT); PYTHON picks the interpreter
#   benchmarks/gpu_check.sh --list                        the stages and their timeouts
#   --only a,b   run only these stages (setup is implied); --budget S   seconds for the whole run
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
CARRY=gpu_carry
STAGES=(setup cuda_tests train_keras train_paper torchrun bench official)
declare -A TIMEOUT=([setup]=90 [cuda_tests]=120 [train_keras]=75 [train_paper]=90 [torchrun]=60 [bench]=110
                    [official]=45)

MODE=gpu ONLY="" BUDGET=285 OFFICIAL_SRC="" PREPARE=0
while (($#)); do
    case $1 in
        --dry-run) MODE=dry-run ;;
        --prepare) PREPARE=1 ;;
        --official) OFFICIAL_SRC=${2:?--official needs a path}; shift ;;
        --only) ONLY=${2:?--only needs stage names}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --list) for s in "${STAGES[@]}"; do echo "$s ${TIMEOUT[$s]}"; done; exit 0 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 2; }
for s in ${ONLY//,/ }; do
    [[ -n ${TIMEOUT[$s]:-} ]] || { echo "gpu_check.sh: unknown stage $s; stages: ${STAGES[*]}" >&2; exit 2; }
done

# ---------------------------------------------------------------------- --prepare (on the CPU machine)
if ((PREPARE)); then
    cifar=${CCT_CIFAR_JPEG:-$REPO/../shared/data/cifar10-jpeg.tar.gz}
    [[ -f $cifar ]] || { echo "gpu_check.sh: no $cifar (set CCT_CIFAR_JPEG)" >&2; exit 2; }
    mkdir -p "$CARRY"
    cp "$cifar" "$CARRY/cifar10-jpeg.tar.gz" || exit 2
    if [[ -n $OFFICIAL_SRC ]]; then
        rm -rf "$CARRY/official" && mkdir -p "$CARRY/official"
        if [[ -f $OFFICIAL_SRC/src/cct.py ]]; then
            cp -r "$OFFICIAL_SRC/src" "$OFFICIAL_SRC/LICENSE" "$CARRY/official/" || exit 2
        else  # a bare git directory (a mirror): its newest commit's src/ and licence
            git --git-dir="$OFFICIAL_SRC" archive HEAD src LICENSE | tar -x -C "$CARRY/official" || exit 2
        fi
        [[ -f $CARRY/official/src/cct.py ]] || { echo "gpu_check.sh: no src/cct.py in $OFFICIAL_SRC" >&2; exit 2; }
    fi
    git check-ignore -q "$CARRY" || { echo "gpu_check.sh: $CARRY is not git-ignored" >&2; exit 2; }
    echo "gpu_carry ready ($(du -sh "$CARRY" | cut -f1), under the device tool's 64 MiB with the tree):"
    ls -R "$CARRY" | head -20
    echo "run on the GPU machine with carry [\"$CARRY\"]: bash benchmarks/gpu_check.sh (timeout_s 330)"
    exit 0
fi

# ---------------------------------------------------------------------- settings of each mode
export PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cct_gpu_check.XXXXXX") || exit 2
export WORK CCT_DATA=$WORK/cache PYTHONUNBUFFERED=1
# the checkout's code first, also where setup installs it: a failed install (recorded as such) must not
# cost the other stages of the one run a lease allows; the dry run installs nothing
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
if [[ $MODE == dry-run ]]; then
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/cct_gpu_check_out.XXXXXX")}
    DEVICE=cpu DATA=$WORK/tree
    KERAS_SIZE="--batch-size 16 --procs 1"
    PAPER_SIZE="--train-limit 48 --epochs 1 --batch-size 16"
    TORCHRUN_SIZE="--train-limit 32 --epochs 1 --batch-size 16"
    BENCH_SIZE="--batch-sizes 8 16 --steps 1 --windows 1 --warmup 1" PEAK_SIZE=256
    OFFICIAL_SIZE="--batch-sizes 8 --steps 1 --windows 1 --warmup 1"
else
    OUT=${OUT:-$REPO/gpu_check_out}
    DEVICE=cuda DATA=$CARRY/cifar10-jpeg.tar.gz
    KERAS_SIZE=""
    PAPER_SIZE="--train-limit 12800 --epochs 3"  # 100 steps of 128 per epoch
    TORCHRUN_SIZE="--train-limit 6400 --epochs 1"
    BENCH_SIZE="--batch-sizes 128 512 2048 --steps 10 --windows 3 --warmup 5" PEAK_SIZE=8192
    OFFICIAL_SIZE="--batch-sizes 128 1024 --steps 10 --windows 3 --warmup 5"
fi
mkdir -p "$OUT" || exit 2
export OUT DEVICE DATA KERAS_SIZE PAPER_SIZE TORCHRUN_SIZE BENCH_SIZE PEAK_SIZE OFFICIAL_SIZE MODE CARRY
LOG=$OUT/gpu_check.log SUMMARY=$OUT/summary.json
: >"$LOG"
START=$(date +%s)
# the paper recipe's schedule, shortened to the run: one warm-up epoch, no cooldown
PAPER_SCHEDULE="--warmup-epochs 1 --cooldown-epochs 0"
export PAPER_SCHEDULE

helper() { "$PY" "$REPO/benchmarks/gpu_check.py" "$@"; }
helper init --summary "$SUMMARY" --mode "$MODE" --budget "$BUDGET" \
    --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >>"$LOG" 2>&1 \
    || { echo "gpu_check.sh: $PY cannot start the summary (see $LOG)" >&2; tail -5 "$LOG" >&2; exit 2; }

# ---------------------------------------------------------------------- the stages (each runs in `bash -c`)
run() { echo "+ $*"; "$@"; }  # each command, expanded, in the log
stage_setup() {
    if [[ $MODE == dry-run ]]; then
        echo "dry run: not installing (would run: $PY -m pip install --no-deps --no-build-isolation -e .)"
        run "$PY" benchmarks/gpu_check.py make-tree "$DATA" || return 1
    else
        run nvidia-smi || echo "nvidia-smi failed; torch decides below whether CUDA works"
        run "$PY" -m pip install --no-deps --no-build-isolation -e . || return 1
        [[ -f $DATA ]] || { echo "no $DATA: run benchmarks/gpu_check.sh --prepare and carry $CARRY"; return 1; }
    fi
    "$PY" -c "import cct, torch; print('cct', cct.__file__, 'torch', torch.__version__, torch.cuda.is_available())
assert '$MODE' == 'dry-run' or torch.cuda.is_available(), 'torch sees no CUDA device'" || return 1
}
stage_cuda_tests() {
    run "$PY" -m pytest -m cuda tests/test_cuda.py -q -rfEs -p no:cacheprovider --junitxml="$WORK/junit.xml"
}
stage_train_keras() {
    run "$PY" -m cct train --model cct_2_3x2_32_keras --recipe keras --data "$DATA" --out "$WORK/runs/keras" \
        --epochs 1 --device "$DEVICE" --seed 0 --quiet $KERAS_SIZE
}
stage_train_paper() {
    run "$PY" -m cct train --model cct_7_3x1_32 --recipe paper --data "$DATA" --out "$WORK/runs/paper" \
        $PAPER_SCHEDULE --device "$DEVICE" --seed 0 --quiet $PAPER_SIZE
}
stage_torchrun() {
    run "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m cct train --model cct_7_3x1_32 \
        --recipe paper --data "$DATA" --out "$WORK/runs/torchrun" $PAPER_SCHEDULE --device "$DEVICE" --seed 0 \
        --quiet $TORCHRUN_SIZE
}
stage_bench() {
    run "$PY" benchmarks/gpu_check.py peak --device "$DEVICE" --precision bf16 --size "$PEAK_SIZE" \
        --json-out "$WORK/peak.json" || return 1
    run "$PY" benchmarks/gpu_check.py bench --device "$DEVICE" --precision bf16 \
        --models cct_2_3x2_32_keras cct_7_3x1_32 $BENCH_SIZE --timeout-each 45 --budget "$((STAGE_TIMEOUT - 15))" \
        --peak "$WORK/peak.json" --json-out "$OUT/bench.json"
}
stage_official() {
    [[ -f $CARRY/official/src/cct.py ]] || { echo "no $CARRY/official/src/cct.py: nothing to time"; return 3; }
    run "$PY" benchmarks/gpu_check.py official --repo "$CARRY/official" --device "$DEVICE" $OFFICIAL_SIZE \
        --budget "$((STAGE_TIMEOUT - 10))" --json-out "$OUT/official.json"
}
export -f run stage_setup stage_cuda_tests stage_train_keras stage_train_paper stage_torchrun stage_bench stage_official

wanted() { [[ -z $ONLY || $1 == setup || ,$ONLY, == *,$1,* ]]; }

# run_stage NAME [record options...]: the stage under min(its timeout, what the budget leaves), then record it
run_stage() {
    local name=$1; shift
    wanted "$name" || return 0
    local now left limit status rc t0 seconds note=""
    now=$(date +%s); left=$((BUDGET - (now - START) - 15))  # a stage may take 10 s of grace past its limit
    limit=$((TIMEOUT[$name] < left ? TIMEOUT[$name] : left))
    if ((limit < 10)); then
        helper record --summary "$SUMMARY" --stage "$name" --status skipped --note "out of time: ${left}s left" \
            --elapsed "$((now - START))" >>"$LOG" 2>&1
        echo "[gpu_check] $name: skipped (out of time)"
        return 0
    fi
    echo "===== $name (timeout ${limit}s) $(date -u +%H:%M:%S)" >>"$LOG"
    t0=$(date +%s)
    STAGE_TIMEOUT=$limit helper run --timeout "$limit" --log "$LOG" -- bash -c "stage_$name"
    rc=$?
    seconds=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124) status=timeout ;;
        3) status=skipped note="nothing to run (see the log)" ;;
        *) status=failed ;;
    esac
    helper record --summary "$SUMMARY" --stage "$name" --status "$status" --rc "$rc" --seconds "$seconds" \
        --timeout "$limit" ${note:+--note "$note"} --elapsed "$(($(date +%s) - START))" "$@" >>"$LOG" 2>&1
    echo "[gpu_check] $name: $status (exit $rc, ${seconds}s of ${limit}s)"
}
export STAGE_TIMEOUT=0

run_stage setup
run_stage cuda_tests --junit "$WORK/junit.xml"
run_stage train_keras --train-out "$WORK/runs/keras" \
    --note "the CPU figure to compare with: the same command with --device cpu (see the log)"
run_stage train_paper --train-out "$WORK/runs/paper"
run_stage torchrun --train-out "$WORK/runs/torchrun"
run_stage bench --result-json "$OUT/bench.json"
run_stage official --result-json "$OUT/official.json"

helper report --summary "$SUMMARY" --elapsed "$(($(date +%s) - START))"
echo "summary: $SUMMARY, log: $LOG"
rm -rf "$WORK"
