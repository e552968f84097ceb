#!/usr/bin/env bash
# GPU checks of the executor and the machine (issues 4 and 10), as one prepared script for an NVIDIA machine; run
# from the repo root. Every step has its own time limit and the script goes on after a failing step, so one call
# returns as much as it can; the whole run stops starting steps after DEADLINE_S seconds.
#   1. the machine: nvidia-smi, lscpu, memory, torch/CUDA versions, oneDNN's ISA (`calibrate isa`); with
#      CUDA_FLAG=on it stops at once (exit 4) when torch sees no CUDA device (every later step would be wasted);
#   2. `executor.machine_bench`: GEMMs by shape on the GPU, device and host-device copies (pinned / pageable,
#      duplex), host DRAM shared between PCIe DMA and a CPU copy;
#   3. a CPU + CUDA profile of Mixtral-8x7B's shapes (one round; written after each device, so a CUDA half that
#      fails keeps the CPU rows), then validations of two CPU+GPU plans against it;
#   4. measured end-to-end points: `coxmoe execute` of Mixtral-8x7B's first layer (real size) under forced
#      knobs, so the simulator can build the very same plans elsewhere (`experiments.gpu_check_report`), the two
#      most informative first;
#   5. the CUDA tests (every policy's plan executed on CUDA against the reference forward pass), then the other
#      end-to-end points.
# The order puts what only the lent GPU can give first (the machine's numbers, the profile and its validations),
# since the deadline skips whatever is left.
# Everything lands in $WORK/gpu_check/ (outside $OUT: the device tool returns at most 8 files) and is packed into
# $OUT/gpu_check.tar.gz after every step, so a run cut short still returns what it measured. Python packages the
# machine lacks travel as wheels in .whl/ (the device call needs carry: [".whl"]; /work/.library/device/README.md).
# Budget: DEADLINE_S (default 450) plus the last step's kill; give the call a timeout_s of about 510.
# Overrides for a dry run on a CPU machine: CUDA_FLAG (on/off), PROFILE_DEVICE (cuda/auto), MB_ARGS (--quick),
# DEADLINE_S, PYTHON.
set -uo pipefail
OUT=${OUT:-out/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
W="$WORK/gpu_check"
rm -rf "$W"
mkdir -p "$W" "$OUT"
MODEL=mixtral-8x7b
CUDA_FLAG=${CUDA_FLAG:-on}
PROFILE_DEVICE=${PROFILE_DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-450}
PY=${PYTHON:-python3}
T0=$(date +%s)

if ! "$PY" -c "import simpy, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
COXMOE=("$PY" -m experiments.cli)
if ! "$PY" -c "import simpy, pydantic, torch" 2> "$W/imports.err"; then  # every step below would fail on import
  { echo "python packages missing (did the call carry .whl/?):"; tail -n 2 "$W/imports.err"; } | tee "$W/steps.txt"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" gpu_check
  cp "$W/steps.txt" "$OUT/steps.txt"
  exit 3
fi

pack() {
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" gpu_check
  cp "$W/steps.txt" "$OUT/steps.txt" 2>/dev/null || true
}

step() {  # step NAME LIMIT_S COMMAND...: with a time limit; stdout to $W/NAME.log, stderr to NAME.err; packs
  local name=$1 limit=$2 t left rc
  shift 2
  t=$(date +%s)
  left=$(( DEADLINE_S - (t - T0) ))
  if (( left < 20 )); then
    echo "$name skipped (deadline)" | tee -a "$W/steps.txt"
    return
  fi
  (( limit > left )) && limit=$left
  timeout --kill-after=10 "$limit" "$@" > "$W/$name.log" 2> "$W/$name.err"
  rc=$?
  printf '%-34s rc=%-3s %4ss  (at %ss)\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$(( $(date +%s) - T0 ))" \
    | tee -a "$W/steps.txt"
  if (( rc != 0 )); then tail -n 4 "$W/$name.err" | cut -c1-300; fi
  pack
}

# 1. the machine
step env 30 bash -c "nvidia-smi; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE; lscpu; free -g; nproc; \
  \"$PY\" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and \
  torch.cuda.get_device_name(0)); print(torch.__config__.show())'"
if [ "$CUDA_FLAG" = on ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "torch sees no CUDA device (CUDA_FLAG=on): stopping" | tee -a "$W/steps.txt"
  pack
  exit 4
fi
step isa 60 "${COXMOE[@]}" calibrate isa --json

# 2. the machine's own numbers
step machine_bench 120 "$PY" -m executor.machine_bench --out "$W/machine_bench.json" ${MB_ARGS:-}
# coxmoe with forced knobs: OP0-OP2 on the GPU, whole-batch micro-batches, two resident experts per layer
CX="prefill_placement=ggg decode_placement=ggg prefill_micro_batch=0 decode_micro_batch=0 resident_experts=2"

# 3. profile (CPU and CUDA rows), then validate two CPU+GPU plans against it
# (INT8's epilogue eager: a cold torch.compile costs ~15 s here, and no INT8 plan is validated)
step profile 200 env COXMOE_CPU_FUSE=eager "${COXMOE[@]}" calibrate profile --model "$MODEL" --out "$W/profile" --device "$PROFILE_DEVICE" \
  --rounds 1 --max-tokens 1024
VAL=(--model "$MODEL" --layers 1 --system h200-8452y --batch 128 --prompt-len 8 --gen-len 8
     --routing table:mixtral-8x7b --cuda "$CUDA_FLAG" --profile "$W/profile" --json)
# shellcheck disable=SC2086
step validate_coxmoe_cpu 90 "${COXMOE[@]}" calibrate validate "${VAL[@]}" --policy coxmoe \
  $(for k in $CX split=cpu; do printf -- '--policy-opt %s ' "$k"; done) --plot "$W/validate_coxmoe_cpu.png"
step validate_moe_lightning 90 "${COXMOE[@]}" calibrate validate "${VAL[@]}" --policy moe-lightning \
  --policy-opt micro_batch=32 --policy-opt num_micro_batches=4 --policy-opt wg=0.25 \
  --plot "$W/validate_moe_lightning.png"

# 4. measured end-to-end points (Mixtral's first layer, real size): forced knobs, one run after a warm-up
POINT=(--model "$MODEL" --layers 1 --system h200-8452y --prompt-len 32 --gen-len 8 --routing table:mixtral-8x7b
       --cuda "$CUDA_FLAG" --json)
own() {  # own NAME BATCH POLICY KNOB=VALUE...
  local name=$1 batch=$2 policy=$3 opts=() k
  shift 3
  for k in "$@"; do opts+=(--policy-opt "$k"); done
  step "own_$name" 75 "${COXMOE[@]}" execute "${POINT[@]}" --batch "$batch" --policy "$policy" "${opts[@]}"
  if [ -s "$W/own_$name.log" ]; then cp "$W/own_$name.log" "$W/own_$name.json"; pack; fi
}
# shellcheck disable=SC2086
own coxmoe_cpu_b128 128 coxmoe $CX split=cpu
own moe_lightning_b128 128 moe-lightning micro_batch=32 num_micro_batches=4 wg=0.25

# 5. the CUDA path against the reference, then the other end-to-end points
TIMEOUT=(); "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout 60)
step pytest_cuda 150 "$PY" -m pytest -rfE -p no:cacheprovider "${TIMEOUT[@]}" -k "cuda or two_gpu" \
  tests/test_executor_numerics.py tests/test_topology.py tests/test_machine_bench.py
own gpu_only_b128 128 gpu-only
# shellcheck disable=SC2086
own coxmoe_gpu_b128 128 coxmoe $CX split=gpu
# FlexGen's CPU attention as the executor runs it (bf16, no fp32 workspace), so the re-simulated plan is the one run
own flexgen_b128 128 flexgen gpu_batch_size=32 num_gpu_batches=4 weights_gpu_percent=50 kv_gpu_percent=0 \
  act_gpu_percent=100 fp32_cpu_attention=off

pack
echo "done in $(( $(date +%s) - T0 )) s: $OUT/gpu_check.tar.gz"
cat "$W/steps.txt"
