#!/usr/bin/env bash
# GPU checks of the executor (issue 4), as one prepared script for an NVIDIA machine; run from the repo root.
# It needs torch with CUDA there (the project's other dependencies install from PyPI or travel as wheels).
# Writes everything under ${OUT:-out/gpu_check}: the device, the CUDA tests, a CPU+CUDA profile of
# Mixtral-8x7B shapes, and validations of GPU plans on two real-size layers. Budget: a few minutes.
set -euo pipefail
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
python -m pytest -q -p no:cacheprovider tests/test_executor_numerics.py "tests/test_topology.py::test_the_executor_runs_a_two_gpu_plan" 2>&1 | tee "$OUT/pytest_executor.txt"
python -m experiments.cli calibrate isa --json > "$OUT/isa.json"
python -m experiments.cli calibrate profile --model mixtral-8x7b --out "$OUT/profile" --device cuda \
    --rounds 3 --max-tokens 1024 2>&1 | tee "$OUT/profile.txt"
for policy in coxmoe moe-lightning; do
  for batch in 64 256; do
    python -m experiments.cli calibrate validate --model mixtral-8x7b --layers 2 --profile "$OUT/profile" \
        --system h200-8452y --policy "$policy" --batch "$batch" --prompt-len 16 --gen-len 4 \
        --routing table:mixtral-8x7b --cuda on --json --plot "$OUT/validate_${policy}_${batch}.png" \
        > "$OUT/validate_${policy}_${batch}.json"
  done
done
python -m experiments.cli execute --model mixtral-8x7b --layers 2 --system h200-8452y --policy coxmoe \
    --batch 256 --prompt-len 16 --gen-len 4 --routing table:mixtral-8x7b --cuda on --json \
    --timeline "$OUT/execute_timeline.json" > "$OUT/execute.json"
echo "done: $OUT"
