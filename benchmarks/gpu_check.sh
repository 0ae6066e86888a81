#!/usr/bin/env bash
# The GPU check, on a machine with CUDA, in about 5 minutes (README, "Several machines and GPUs"):
#   1. the tests marked cuda: float32 CPU-against-CUDA equality of the denoiser, the DCG, the scheduler and one
#      sampled batch (TF32 off, 1e-4), a bf16-mixed fit of a tiny config, DDP over NCCL on every visible GPU with
#      the 1 == N metrics check (when there are two GPUs or more);
#   2. benchmarks/speed.py at the paper's settings (configs/isic.yml, batch 64) in float32 and bf16-mixed: images
#      per second of a training step (model only and Lightning's fit on HAM10000 JPEGs, data loading included),
#      of a sampled batch, and the fraction of the measured matmul peak.
# Everything it writes goes to benchmarks/results/ (gpu_check_tests.txt, gpu_check_speed.txt, speed_cuda.{md,json}).
# Time limits: 120 s for the tests, 180 s for the speed run (5 minutes in all).
#
#   bash benchmarks/gpu_check.sh [WORKERS]      # WORKERS: data loader workers for the end-to-end fit (default 12)
# PYTHON=/path/to/python picks the interpreter (default: python on the PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
workers="${1:-12}"
python="${PYTHON:-python}"
"$python" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "torch", torch.__version__)
EOF
start=$(date +%s)
# each stage has its own time limit, so a hung NCCL rendezvous ends the script instead of stalling it; a failing test
# does not stop the speed measurement, and the script's exit status is the tests' (then the speed run's)
set +e
timeout 120 "$python" -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$results/gpu_check_tests.txt"
tests_status=${PIPESTATUS[0]}
echo "tests: exit $tests_status, $(( $(date +%s) - start )) s" | tee -a "$results/gpu_check_tests.txt"
# the end-to-end fit reads HAM10000's JPEGs from ../shared/data (benchmarks/speed.py unpacks them); without them only
# the model-only step and sampling are timed
end_to_end=()
[ -f ../shared/data/ham10000_200x150/images.zip ] || end_to_end=(--no-end-to-end)
timeout 180 "$python" -m benchmarks.speed --config configs/isic.yml --device cuda --batch-size 64 --repeats 5 \
    --workers "$workers" "${end_to_end[@]}" 2>&1 | tee "$results/gpu_check_speed.txt"
speed_status=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_status, speed exit $speed_status, $(( $(date +%s) - start )) s; results in" \
    "$results/gpu_check_tests.txt, gpu_check_speed.txt and speed_cuda.md"
[ "$tests_status" -eq 0 ] && exit "$speed_status"
exit "$tests_status"
