#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (a fresh, bare one: minutes count). From the repository root:
#   bash bench/gpu_check.sh            # figures land in $OUT (or ./gpu-out)
# 1. the CUDA tests (parity on the GPU, cache sizes, CPU-computed misses, the GPU budget from outside);
# 2. bench --profile on a resident e512 checkpoint: ops and host syncs per decode token on the GPU;
# 3. bench/bench_gpu.py --gpu-mem 24: resident and budget decode against transformers (+ accelerate),
#    CPU+GPU against copy-only, under a consumer card's budget.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python -m pip install --quiet torch==2.13.0 ".[test]" accelerate >"$OUT/pip.log" 2>&1 || true
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -m pytest -q -m gpu tests/runtime/test_gpu.py tests/experts/test_cache.py tests/model/test_spill.py \
  tests/runtime/test_sampling.py >"$OUT/pytest-gpu.txt" 2>&1
echo "pytest exit $?" >>"$OUT/pytest-gpu.txt"
python -m qwen35_lite.cli make-checkpoint /tmp/q35-e512 --experts 512 --top-k 10 --layers 8 --hidden 1024 \
  --moe-intermediate 64 >/dev/null 2>&1 || true
python -m qwen35_lite.cli bench -m /tmp/q35-e512 --device cuda --prompt-tokens 64 --new-tokens 32 --profile \
  --json >"$OUT/bench-profile.json" 2>"$OUT/bench-profile.err"
python bench/bench_gpu.py --root /tmp/q35 --gpu-mem 24 --out "$OUT/benchmarks.md" \
  --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.txt" 2>&1
echo "bench_gpu exit $?" >>"$OUT/bench_gpu.txt"
