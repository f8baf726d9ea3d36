#!/usr/bin/env bash
# The GPU executors on a CUDA GPU: flex and varlen/auto tests (forward and
# backward against the float64 reference), CUDA-graph capture, block-mask construction and the
# executor benchmark against ideal and ceiling. Run on the device machine from
# the repository root; results go to $OUT (or ./gpu-out). Takes ~12 minutes on
# an H100 without the back-to-back columns (bench_gpu --b2b 0), ~20 with
# them: split it across calls (a call is limited to 10 minutes).
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
python3 -m pytest tests/test_varlen.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_varlen.txt" | tail -5
python3 -m pytest tests/test_cuda_graphs.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda_graphs.txt" | tail -5
python3 benchmarks/bench_blockmask.py --device cuda --repeat 50 2>&1 | grep -v -i warn | tee "$OUT/blockmask_cuda.txt"
python3 benchmarks/bench_gpu.py --repeat 15 2>&1 | grep -v "^W1" | tee "$OUT/gpu_bench.txt"
python3 benchmarks/bench_gpu.py --profile "self-anchor 2x(1k" 2>&1 | grep -v "^W1" > "$OUT/profile_self_anchor_10k.txt"
