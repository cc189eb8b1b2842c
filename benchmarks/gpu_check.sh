#!/usr/bin/env bash
# The GPU checks of issue 27 in one command, on a machine with one or more NVIDIA GPUs (under 10 minutes on one):
#   bash benchmarks/gpu_check.sh
# 1. the CUDA tests (every test marked `cuda`, which tests/conftest.py gives each test skipped without CUDA);
# 2. 16-mixed and bf16-mixed debug fits with accumulation, pruning, QAT, the chunked loss and recomputation together
#    (a combination refused by design, such as bf16-mixed where cuDNN's RNN autocast runs float16, shows its sentence);
# 3. `estimate` of a run on the GPU next to the MemoryMonitor's measured peak of the same run;
# 4. with 2 GPUs or more: a DDP fit, its resume, and the refusal of sparse embedding gradients over NCCL.
# Prints a summary; exits non-zero if any step failed. Runs its fits in a temporary folder, which it removes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d -t lm_lightning_gpu_check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
STEP_LIMIT=240  # seconds per step: a hang fails that step, not the whole machine's time
SUMMARY=()
FAILED=0

record() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }

# run NAME REFUSAL CMD...: ok on exit 0; "refused by design" on exit 2 whose last line holds REFUSAL (if given).
run() {
    local name=$1 refusal=$2 status=0 out last
    shift 2
    echo "=== $name: $*"
    out=$(cd "$WORK" && timeout "$STEP_LIMIT" "$@" 2>&1) || status=$?
    last=$(printf '%s\n' "$out" | tail -n 1)
    if [[ $status -eq 0 ]]; then
        record "$name" "ok"
    elif [[ $status -eq 2 && -n $refusal && $last == *"$refusal"* ]]; then
        record "$name" "refused by design: ${last#error: }"
    else
        record "$name" "FAILED (exit $status): $last"
        FAILED=1
        printf '%s\n' "$out" | tail -n 40
    fi
    LAST_OUTPUT=$out
}

if ! command -v nvidia-smi >/dev/null || [[ $(nvidia-smi -L | wc -l) -lt 1 ]]; then
    echo "gpu_check.sh needs an NVIDIA GPU (nvidia-smi -L lists none)." >&2
    exit 1
fi
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi -L

# --- 1. the CUDA tests ------------------------------------------------------------------------------------------
selected=$(cd "$ROOT" && "$PYTHON" -m pytest -q --collect-only -m cuda tests 2>/dev/null | grep '::' || true)
echo "$selected"
if [[ -f "$ROOT/tests/test_cuda_estimate.py" ]] && ! grep -q '^tests/test_cuda_estimate.py::' <<<"$selected"; then
    record "cuda tests selected" "FAILED: none of tests/test_cuda_estimate.py is marked cuda (mark it, or skip it with a reason naming CUDA)"
    FAILED=1
fi
status=0
(cd "$ROOT" && timeout 420 "$PYTHON" -m pytest -q -rs -m cuda tests) || status=$?
record "cuda tests ($(grep -c '::' <<<"$selected") selected)" "$([[ $status -eq 0 ]] && echo ok || echo "FAILED (exit $status)")"
[[ $status -eq 0 ]] || FAILED=1

# --- 2. mixed precision with every strategy that changes the training step ---------------------------------------
DEBUG=(-c "$ROOT/configs/default.yaml" -c "$ROOT/configs/presets/debug.yaml" --trainer.accelerator gpu --trainer.devices 1
       --trainer.enable_progress_bar false)
STRATEGIES=(-c "$ROOT/configs/memory/accumulation.yaml" -c "$ROOT/configs/memory/pruning.yaml" -c "$ROOT/configs/memory/qat.yaml"
            -c "$ROOT/configs/memory/chunked_loss.yaml" -c "$ROOT/configs/memory/recompute.yaml")
for precision in 16-mixed bf16-mixed; do
    run "fit $precision, 5 strategies" "--trainer.precision bf16-mixed would run" \
        "$PYTHON" -m lm_lightning fit "${DEBUG[@]}" "${STRATEGIES[@]}" --trainer.precision "$precision"
done

# --- 3. estimate against the measured peak of the same run -------------------------------------------------------
MONITORED=("${DEBUG[@]}" -c "$ROOT/configs/memory/monitor.yaml")
run "estimate (gpu)" "" "$PYTHON" -m lm_lightning estimate "${MONITORED[@]}"
ESTIMATED=$(grep -i 'peak' <<<"$LAST_OUTPUT" | head -n 3 || true)
run "fit measured by MemoryMonitor" "" "$PYTHON" -m lm_lightning fit "${MONITORED[@]}"
MEASURED=$(grep -i 'peak' <<<"$LAST_OUTPUT" | tail -n 3 || true)

# --- 4. several GPUs: DDP over NCCL -------------------------------------------------------------------------------
if [[ $GPUS -ge 2 ]]; then
    DDP=(-c "$ROOT/configs/default.yaml" -c "$ROOT/configs/presets/debug.yaml" --trainer.accelerator gpu --trainer.devices 2
         --trainer.strategy ddp --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir ddp)
    run "ddp fit (2 GPUs)" "" "$PYTHON" -m lm_lightning fit "${DDP[@]}"
    run "ddp resume (2 GPUs)" "" "$PYTHON" -m lm_lightning fit "${DDP[@]}" --trainer.max_epochs 2 \
        --ckpt_path ddp/lightning_logs/version_0/checkpoints/last.ckpt
    run "ddp sparse gradients (refused)" "Sparse embedding gradients cannot train under" \
        "$PYTHON" -m lm_lightning fit "${DDP[@]}" -c "$ROOT/configs/memory/sparse_gradients.yaml" \
        --model.network.tie_weights false --model.optimizer SGD --model.optimizer.lr 1 --model.optimizer.weight_decay 0
    if [[ ${SUMMARY[-1]} != *"refused by design"* ]]; then  # a sparse DDP run over NCCL must never start
        SUMMARY[-1]="${SUMMARY[-1]} (expected the refusal)"
        FAILED=1
    fi
else
    record "ddp (needs 2 GPUs)" "skipped: $GPUS GPU"
fi

echo
echo "=== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $GPUS GPU)"
printf '%s\n' "${SUMMARY[@]}"
echo "--- estimate's peak lines:"
echo "${ESTIMATED:-  (none printed)}"
echo "--- MemoryMonitor's peak lines of the same run:"
echo "${MEASURED:-  (none printed)}"
[[ $FAILED -eq 0 ]] && echo "gpu_check: all passed" || echo "gpu_check: FAILED"
exit "$FAILED"
