#!/usr/bin/env bash
# The one prepared GPU run of issue 13: prints every figure of its Targets and writes them to
# docs/benchmarks/gpu_benchmark_<date>_<time>.txt (command lines, outputs, wall times; UTC).
#
#   MAE_CHECKOUT=/path/to/mae scripts/gpu_benchmark.sh     # on the GPU machine: about 9 minutes on an H200
#   MAE_CHECKOUT=/path/to/mae scripts/gpu_benchmark.sh --dry-run OUT_DIR   # CPU, tiny sizes: the plumbing only
#   MAE_CHECKOUT=/path/to/mae scripts/gpu_benchmark.sh --followup [--dry-run OUT_DIR]
#       the follow-up run for the targets the first H200 run (docs/benchmarks/gpu_benchmark_h200_2026-12-05.txt)
#       missed, written to gpu_followup_<date>_<time>.txt: see "Follow-up sections" below
#
# MAE_CHECKOUT is a clone of facebookresearch/mae (models_mae.py and util/pos_embed.py are imported from it; nothing
# of it is copied into this repository: keep it in a git-ignored folder and carry it to the machine). Without it
# the side-by-side sections are skipped, and say so.
#
# Written for a fresh machine: the Inductor cache starts empty (compile times are measured and printed as
# "warm-up s" / "first ... incl. compile"; a detection phase that reuses earlier graphs says "(no compile: graphs
# reused)"), one compiled variant per section, default Inductor (no max-autotune).
# Sections, each under its own time limit, most important first; a section whose limit would end past BUDGET
# (560 s from the start, wheel install included) is skipped (the limits add up to 530 s after section 1, so all
# run when the install takes under 30 s), and the side-by-side runs start no round past their --max-seconds.
# Stopped at its limit, a section still prints what it measured; a variant that fails (compile error, out of
# memory) is listed as failed and the others go on:
#   1. machine and versions
#   2. ours vs official, ViT-B batch 64, step-only and end to end (2,000 JPEGs of 500x375, 16 workers; our loader
#      with PIL workers and with nvjpeg): img/s, MFU, peak memory per image, ratios, compile time
#   3. the same at the large-batch recipe's 512 per GPU, step-only: MFU and memory per image
#   4. detection ViT-B 1024 px fp16: backbone fwd+bwd eager/compiled vs Detectron2's ViTDet, training iteration at
#      batch 4 through the Detectron2 loader with LSJ (s/img)
#   5. ours, visible-only vs all-tokens, every precision, batch 64 (the FLOP-ratio target; today's 17 % bf16 MFU)
# Follow-up sections (--followup). The first run found the batch-64 step bound by the host thread (~28 ms a step
# that does not grow with the batch), so each section adds CUDA graphs (torch.compile mode reduce-overhead):
#   1. machine and versions, and the size of /dev/shm (the loaders' batches pass through it)
#   2. ours vs official, batch 256, step-only and end to end (8,192 JPEGs, 16 workers, PIL and nvjpeg), ours
#      compiled with CUDA graphs: the end-to-end target (>= 0.85 of step-only) where the step is not host-bound,
#      with 256 rather than 512: 16 workers x 2 prefetched batches a loader hold ~5 GB of /dev/shm for the official
#      loader's float batches and ~1.2 GB for each of ours (uint8), twice that at 512, and /dev/shm's size is unknown
#   3. ours, visible-only vs all-tokens, bf16, batch 64, compiled with CUDA graphs (the FLOP-ratio target)
#   4. ours vs official, batch 512, step-only, ours compiled with CUDA graphs (MFU >= 45 %, >= 1.5x official)
#
# On a machine without this project's .venv (a GPU machine with PyTorch and no internet), python3 runs it and
# WHEELHOUSE=DIR names the wheels made beforehand with `bash scripts/wheelhouse.sh download DIR 3.12 0.16.0` (for
# torch 2.11 there): they are installed into a temporary folder first. GPU_BENCHMARK_LOG_DIR=DIR writes the log
# (and the run's stderr, gpu_..._<time>.stderr) there instead of docs/benchmarks, e.g. a folder that comes back from
# a remote run even when it is stopped at its time limit. A section stopped at its time limit (exit 124) is listed as
# such, not as failed: the exit status is 1 only for sections that failed.
set -uo pipefail
# Folders are relative to where the command runs, not to the repository this script moves to.
abspath() { [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }
DRY=0
FOLLOWUP=0
OUT=""
[[ -z "${GPU_BENCHMARK_LOG_DIR:-}" ]] || OUT=$(abspath "$GPU_BENCHMARK_LOG_DIR")
ARGS="$*"
while (( $# )); do
    case $1 in
        --dry-run)
            if (( $# < 2 )) || [[ $2 == -* ]]; then
                echo "scripts/gpu_benchmark.sh: --dry-run needs an output folder (--dry-run DIR)" >&2
                exit 2
            fi
            DRY=1; OUT=$(abspath "$2"); shift 2 ;;
        --followup) FOLLOWUP=1; shift ;;
        *) echo "scripts/gpu_benchmark.sh: unknown argument '$1' (expected --followup and/or --dry-run DIR)" >&2
           exit 2 ;;
    esac
done
[[ -z "${MAE_CHECKOUT:-}" ]] || MAE_CHECKOUT=$(abspath "$MAE_CHECKOUT")
[[ -z "${WHEELHOUSE:-}" ]] || WHEELHOUSE=$(abspath "$WHEELHOUSE")
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=560  # s, wheel install included: a 600 s run limit leaves room for the copy of the log
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT=${OUT:-docs/benchmarks}
mkdir -p "$OUT"
# The time in the name: a second run on the same day (a retry after a stopped one) keeps the first one's log.
LOG="$OUT/gpu_$( ((FOLLOWUP)) && echo followup || echo benchmark)_$(date -u +%Y-%m-%d_%H%M%S).txt"
if [[ -e "$LOG" ]]; then
    echo "scripts/gpu_benchmark.sh: $LOG exists (a run started in the same second): not overwriting it" >&2
    exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT  # images, wheels, compile cache: GBs on the GPU machine (a failure's stderr is printed first)
# This run's stderr only (its failures' summary below quotes it): next to its log when that comes back from a remote run
ERR="$WORK/stderr.txt"
[[ -z "${GPU_BENCHMARK_LOG_DIR:-}" ]] || ERR="${LOG%.txt}.stderr"
: > "$ERR"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"  # cold: the compile times printed are a fresh machine's
if [[ -n "${WHEELHOUSE:-}" ]]; then
    PYTHON="$PY" bash scripts/wheelhouse.sh install "$WHEELHOUSE" "$WORK/site" \
        || { echo "wheelhouse install failed" >&2; exit 1; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
FAILED=()
STOPPED=()

section() {  # NAME LIMIT_S COMMAND... : runs it with its output appended to $LOG, unless past the budget
    local name=$1 limit=$2
    shift 2
    if (( SECONDS - START + limit > BUDGET )); then
        printf '\n### %s\nskipped: its %d s limit would end past %d s\n' "$name" "$limit" "$BUDGET" >> "$LOG"
        return
    fi
    printf '\n### %s\n$ %s\n' "$name" "$*" >> "$LOG"
    local t0=$SECONDS rc=0
    # SIGTERM at the limit: the benchmark tools then print what they measured so far; KILL 20 s later
    timeout -k 20 "$limit" "$@" >> "$LOG" 2>> "$ERR" || rc=$?
    printf '[%s: exit %d after %d s%s]\n' "$name" "$rc" $((SECONDS - t0)) \
        "$( ((rc == 124)) && echo ", stopped at its $limit s limit")" >> "$LOG"
    # 124: SIGTERM at the limit, after which the tool printed what it measured; 137: it had to be killed
    if (( rc == 124 )); then STOPPED+=("$name"); elif (( rc )); then FAILED+=("$name (exit $rc)"); fi
}

if (( DRY )); then
    export MAE_DET_COMPILE_BACKEND=aot_eager  # Inductor's C++ builds would take minutes on a CPU
    DEV=cpu; QUICK=--quick; PRE_ARGS=(--iters 1 --warmup 1); SIDE=(--rounds 2 --iters 1 --warmup 1 --workers 0)
    SIDE_LARGE=("${SIDE[@]}")
    JPEGS=(--jpeg-folder "$WORK/jpegs" --workers 0); DET=(--quick --workers 0); DET_PRECISION=fp32
    B256=(--batch-size 2); B512=(--batch-size 2); CG_PRECISIONS=fp32
    SIDE_CG=("${SIDE[@]}"); SIDE_CG_LARGE=("${SIDE[@]}")
else
    DEV=cuda; QUICK=; PRE_ARGS=(--iters 10 --warmup 3); SIDE=(--rounds 5 --iters 10 --warmup 3 --workers 16
    --max-seconds 150); SIDE_LARGE=(--rounds 5 --iters 3 --warmup 2 --max-seconds 90)
    JPEGS=(--jpeg-folder "$WORK/jpegs" --jpeg-images 2000 --workers 16); DET=(--size base --img-size 1024 --batch 4
    --iters 5 --workers 16); DET_PRECISION=fp16
    B256=(--batch-size 256 --jpeg-images 8192); B512=(--batch-size 512); CG_PRECISIONS=bf16
    SIDE_CG=(--rounds 3 --iters 5 --warmup 2 --workers 16 --max-seconds 150)
    SIDE_CG_LARGE=(--rounds 3 --iters 3 --warmup 2 --max-seconds 90)
fi

{
    echo "# scripts/gpu_benchmark.sh $ARGS"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), git ${MAE_DET_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
} > "$LOG"
section "1. machine" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo 'no nvidia-smi'; nproc; df -h /dev/shm | tail -n 1; $PY -c 'import torch, torchvision, timm; \
print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"timm\", timm.__version__); \
import importlib.util as u; print(\"torchcodec installed:\", u.find_spec(\"torchcodec\") is not None)'"
if (( FOLLOWUP )); then
    if [[ -n "${MAE_CHECKOUT:-}" ]]; then
        section "2. ours vs official, batch 256, step-only and end to end, CUDA graphs" 200 "$PY" \
            tools/benchmark_pretrain.py --against-official "$MAE_CHECKOUT" --device "$DEV" \
            --compile-modes reduce-overhead "${SIDE_CG[@]}" "${JPEGS[@]}" "${B256[@]}" $QUICK
    else
        printf '\n### 2. ours vs official\nskipped: MAE_CHECKOUT is not set\n' >> "$LOG"
    fi
    section "3. visible-only vs all-tokens, $CG_PRECISIONS, batch 64, CUDA graphs" 130 "$PY" \
        tools/benchmark_pretrain.py --device "$DEV" --batch-size 64 --precisions "$CG_PRECISIONS" \
        --compile-modes reduce-overhead "${PRE_ARGS[@]}" $QUICK
    if [[ -n "${MAE_CHECKOUT:-}" ]]; then
        section "4. ours vs official, batch 512, step-only, CUDA graphs" 150 "$PY" tools/benchmark_pretrain.py \
            --against-official "$MAE_CHECKOUT" --device "$DEV" "${B512[@]}" --compile-modes reduce-overhead \
            "${SIDE_CG_LARGE[@]}" $QUICK
    fi
else
    if [[ -n "${MAE_CHECKOUT:-}" ]]; then
        section "2. ours vs official, batch 64, step-only and end to end" 200 "$PY" tools/benchmark_pretrain.py \
            --against-official "$MAE_CHECKOUT" --device "$DEV" --batch-size 64 --compile "${SIDE[@]}" \
            "${JPEGS[@]}" $QUICK
        section "3. ours vs official, batch 512 (large-batch recipe), step-only" 140 "$PY" \
            tools/benchmark_pretrain.py --against-official "$MAE_CHECKOUT" --device "$DEV" --batch-size 512 \
            --compile "${SIDE_LARGE[@]}" $QUICK
    else
        printf '\n### 2.-3. ours vs official\nskipped: MAE_CHECKOUT is not set\n' >> "$LOG"
    fi
    section "4. detection ViT-B 1024 px, $DET_PRECISION, compiled backbone, D2 loader + LSJ" 140 "$PY" \
        tools/benchmark_det.py --device "$DEV" --precision "$DET_PRECISION" --compile --real-data "$WORK/shapes" \
        "${DET[@]}"
    section "5. visible-only vs all-tokens, batch 64" 50 "$PY" tools/benchmark_pretrain.py --device "$DEV" \
        --batch-size 64 "${PRE_ARGS[@]}" $QUICK
fi
printf '\n[total %d s]\n' $((SECONDS - START)) >> "$LOG"
cat "$LOG"
echo "written: $LOG" >&2
(( ${#STOPPED[@]} == 0 )) || printf 'stopped at its time limit (its figures so far are in the log): %s\n' \
    "${STOPPED[@]}" >&2
if (( ${#FAILED[@]} )); then
    printf 'failed: %s\n' "${FAILED[@]}" >&2
    echo "this run's errors:" >&2
    tail -n 40 "$ERR" >&2
    exit 1
fi
exit 0
