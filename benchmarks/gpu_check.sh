#!/usr/bin/env bash
# The GPU check, on a machine with CUDA, in about 5 minutes (README, "Several machines and GPUs"):
#   1. the tests marked cuda: float32 CPU-against-CUDA equality of the denoiser, the DCG, the scheduler and one
#      sampled batch (the configured float32 policy, 1e-4), the float32-kept layers under a TF32 policy, a tiny fit
#      in every supported precision, then DDP over NCCL on every visible GPU with the 1 == N metrics check (when
#      there are two GPUs or more);
#   2. benchmarks/speed.py at the paper's settings (configs/isic.yml, batch 64) in float32 and bf16-mixed: images
#      per second of a training step (model only and Lightning's fit on HAM10000 JPEGs, data loading included),
#      of a sampled batch, and the fraction of the measured matmul peak.
# Everything it writes goes to benchmarks/results/ (gpu_check_tests.txt, gpu_check_speed.txt, speed_cuda.{md,json}).
# Time limits, each stage its own (5 minutes in all): 130 s for the tests on one GPU, 60 s for the DDP-over-NCCL test,
# 110 s for the speed run. `timeout -k` sends SIGKILL 10 s after SIGTERM: a process stuck in NCCL ignores SIGTERM and
# would keep its GPUs through the next stage.
#
#   bash benchmarks/gpu_check.sh [WORKERS]      # WORKERS: data loader workers for the end-to-end fit (default 12)
# PYTHON=/path/to/python picks the interpreter (default: the README's environment, .venv/bin/python, where it exists;
# else python3 on the PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
workers="${1:-12}"
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
python="${PYTHON:-$default_python}"
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
# four pytest workers share the GPU (the tiny fits are mostly start-up); -n 0 for the NCCL test, which takes every GPU
timeout -k 10 130 "$python" -m pytest -q -n 4 --dist load -m cuda tests/test_cuda.py -k "not nccl" 2>&1 \
    | tee "$results/gpu_check_tests.txt"
tests_status=${PIPESTATUS[0]}
echo "tests: exit $tests_status, $(( $(date +%s) - start )) s" | tee -a "$results/gpu_check_tests.txt"
timeout -k 10 60 "$python" -m pytest -q -n 0 -m cuda tests/test_cuda.py -k "nccl" 2>&1 \
    | tee -a "$results/gpu_check_tests.txt"
ddp_status=${PIPESTATUS[0]}
echo "DDP over NCCL: exit $ddp_status, $(( $(date +%s) - start )) s" | tee -a "$results/gpu_check_tests.txt"
[ "$tests_status" -eq 0 ] && tests_status=$ddp_status
# the end-to-end fit reads HAM10000's JPEGs from ../shared/data (benchmarks/speed.py unpacks them); without them only
# the model-only step and sampling are timed
end_to_end=()
[ -f ../shared/data/ham10000_200x150/images.zip ] || end_to_end=(--no-end-to-end)
# ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error on bash before 4.4
timeout -k 10 110 "$python" -m benchmarks.speed --config configs/isic.yml --device cuda --batch-size 64 --repeats 3 \
    --workers "$workers" ${end_to_end[@]+"${end_to_end[@]}"} 2>&1 | tee "$results/gpu_check_speed.txt"
speed_status=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_status, speed exit $speed_status, $(( $(date +%s) - start )) s; results in" \
    "$results/gpu_check_tests.txt, gpu_check_speed.txt and speed_cuda.md"
[ "$tests_status" -eq 0 ] && exit "$speed_status"
exit "$tests_status"
