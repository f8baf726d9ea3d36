#!/usr/bin/env bash
# FlexAttention backend on a CUDA GPU: the backend's tests (forward and
# backward against the float64 reference) and the benchmarks. Run on the
# device machine from the repository root; results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/test_flex.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_flex.txt" | tail -5
python3 benchmarks/bench_blockmask.py --device cuda --repeat 50 2>&1 | grep -v -i warn | tee "$OUT/blockmask_cuda.txt"
python3 benchmarks/bench_runtime.py --device cuda --dtype bfloat16 --repeat 20 2>&1 | tee "$OUT/runtime_cuda_bf16.txt"
python3 benchmarks/bench_runtime.py --device cuda --dtype float32 --repeat 20 2>&1 | tee "$OUT/runtime_cuda_fp32.txt"
