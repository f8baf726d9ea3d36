#!/usr/bin/env bash
# The GPU side of patternc, in stages of a few minutes each (times are rough,
# on a Hopper GPU):
#   tests      the GPU test files (forward and backward against the float64
#              reference); ~2 min with pytest-xdist from .whl
#              (benchmarks/device_wheels.sh), else one file after another
#   blockmask  block-mask construction against create_block_mask   ~1 min
#   frames     block-causal video block masks (32k, 128k tokens) against
#              create_block_mask                                   ~1 min
#   users      bench_users: every row, patternc against hand-written
#              FlexAttention and varlen_attn layers                ~8 min
#   small      bench_gpu on the 10k AB-UPT and document layouts     ~6 min
#   large      bench_gpu on the 65k AB-UPT layouts                  ~8 min
#   sweep      FlexAttention kernel_options, forward and backward   ~3 min
#   sweep_fp32 FlexAttention float32: product precision and tiles  ~3 min
#   fa4tests   with FlashAttention 4 on the path: varlen's GPU tests (FA4
#              eager and inside torch.compile) and the CUDA-graph tests ~3 min
#   fa4gpu     varlen's GPU cases on FlashAttention 4 only         ~2 min
#   fa4quick   with FlashAttention 4 on the path: varlen's GPU tests, then
#              the 65k training step, hand against patternc, eager and
#              compiled (6 steps)                                  ~8 min
#   step       a whole AB-UPT training step, eager and compiled (hand
#              models with K/V of every token and of anchors only; patternc
#              with and without the key space)                      ~5 min
#   step10k    the same at 2x(1k+4k) tokens                        ~5 min
#   distributed  context-parallel: gloo tests (2 and 4 processes) and the
#              NCCL world-of-one tests, bench_distributed on gloo (2, 4
#              ranks on the host's cores) and under torchrun/NCCL, and
#              chunked inference at a million queries                ~5 min
#   windows    bench_users: the NATTEN and VLM rows, and the causal window at
#              16k, 64k and 131k tokens (hand block mask compiled: an eager
#              one needs 128 GiB at 131k), auto's pick against both kernels
#                                                                 ~5 min
#   tiles      bench_users: the prefix-LM row at ~64k and the window at ~64k
#              with the flex executor's forward tiles and with torch's
#              (--forward-tiles torch): whether the tiles set their gap ~6 min
#   diagnose   bench_users --diagnose on the VLM and prefix-LM rows at ~4k
#              tokens: kernels and host time per call, piece by piece, and
#              the functions that take the host time (cProfile)      ~2 min
#   ringrate   the ring's CUDA tests (the fused log-sum-exp merge; the
#              flash-kernel and FlexAttention blocks forward and backward
#              through it against the float64 reference), then the
#              blockwise kernel's TF/s over the blocks 8 virtual ranks
#              compute against the unsharded executor's, under --kernel
#              auto and flex                                      ~8-10 min
#   blockkernels  the ring block's candidate kernels (FlashAttention 2 and
#              cuDNN through torch): returns, merged backward against float64,
#              TF/s on ring-sized blocks                             ~1 min
# Usage: bash benchmarks/gpu_check.sh [STAGE ...]   (no stage: all of them)
# Run from the repository root; results go to $OUT (or ./gpu-out). To keep a
# result, copy it to benchmarks/results/<card>_<file>_<yyyy-mm>.txt with the
# command, card and torch version in its first line.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ -d /tmp/fa4site ]; then  # FlashAttention 4, installed by benchmarks/fa4_wheels.sh install
  export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"
python3 -c 'from patternc.nn.executors import flash4; print("flash-attn-4 installed:", flash4.installed())' | tee -a "$OUT/gpu.txt"

GPU_TESTS=(key_space flex shaped value_guard varlen cuda_graphs cookbook compile robustness distributed_merge distributed_ring)
tests() {
  # with pytest-xdist on the path (benchmarks/device_wheels.sh), all files at
  # once on 6 workers (compiles are CPU-bound); else one file after another
  if python3 -c "import xdist" 2>/dev/null; then
    local files=()
    for module in "${GPU_TESTS[@]}"; do files+=("tests/test_$module.py"); done
    python3 -m pytest "${files[@]}" -q -p no:cacheprovider -n 6 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
    return
  fi
  for module in "${GPU_TESTS[@]}"; do
    python3 -m pytest "tests/test_$module.py" -q -p no:cacheprovider 2>&1 | tee "$OUT/test_$module.txt" | tail -5
  done
}
blockmask() {
  python3 benchmarks/bench_blockmask.py --device cuda --repeat 50 2>&1 | grep -v -i warn | tee "$OUT/bench_blockmask.txt"
}
frames() {  # block-causal video masks from scratch against create_block_mask
  python3 benchmarks/bench_blockmask.py --frames --repeat 20 --device cuda 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_blockmask_frames.txt"
}
users() {  # patternc layers against hand-written FlexAttention and varlen_attn, every row
  timeout 560 python3 benchmarks/bench_users.py --repeat 11 --hand-mask eager 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_users.txt" | tail -40
}
small() {
  python3 benchmarks/bench_gpu.py --repeat 15 --no-sweep --control --layouts "1k+4k" documents 2>&1 | grep -v "^W1" | tee "$OUT/bench_gpu_small.txt"
}
large() {
  python3 benchmarks/bench_gpu.py --repeat 15 --no-sweep --layouts "8k+24k" 2>&1 | grep -v "^W1" | tee "$OUT/bench_gpu_large.txt"
}
sweep() {
  python3 benchmarks/bench_gpu.py --repeat 15 --sweep-only 2>&1 | grep -v "^W1" | tee "$OUT/flex_tiles.txt"
}
sweep_fp32() {
  python3 benchmarks/bench_gpu.py --repeat 7 --sweep-fp32 2>&1 | grep -v "^W1" | tee "$OUT/flex_tiles_fp32.txt"
}
fa4tests() {
  for module in varlen cuda_graphs; do
    python3 -m pytest "tests/test_$module.py" -q -p no:cacheprovider 2>&1 | tee "$OUT/test_${module}_fa4.txt" | tail -5
  done
}
fa4gpu() {  # the GPU cases on FlashAttention 4 alone: eager and inside torch.compile
  timeout 170 python3 -m pytest tests/test_varlen.py -q -p no:cacheprovider -k "flash4 and gpu" 2>&1 \
    | tee "$OUT/test_varlen_fa4_gpu.txt" | tail -8
}
fa4quick() {
  timeout 240 python3 -m pytest tests/test_varlen.py -q -p no:cacheprovider -k "flash4 or gpu" 2>&1 \
    | tee "$OUT/test_varlen_fa4.txt" | tail -5
  timeout 320 python3 benchmarks/bench_step.py --steps 6 --variants hand patternc 2>&1 | grep -v "^W1\|Warning" \
    | tee "$OUT/bench_step_fa4.txt"
}
step() {
  python3 benchmarks/bench_step.py --steps 15 2>&1 | grep -v "^W1\|Warning" | tee "$OUT/bench_step.txt"
}
step10k() {
  python3 benchmarks/bench_step.py --steps 15 --anchors 1024 --queries 4096 2>&1 | grep -v "^W1\|Warning" | tee "$OUT/bench_step_10k.txt"
}

distributed() {
  python3 -m pytest tests/test_distributed.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_distributed.txt" | tail -5
  python3 benchmarks/bench_distributed.py --worlds 2 4 --repeat 5 2>&1 | grep -v -i "warn\|return func" | tee "$OUT/bench_distributed_gloo.txt"
  python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" benchmarks/bench_distributed.py --scale 4 --repeat 10 \
    2>&1 | grep -v -i "warn\|return func" | tee "$OUT/bench_distributed_nccl.txt"
  python3 benchmarks/bench_chunked.py --queries 1000000 --anchors 16384 --chunks 16384 65536 262144 2>&1 \
    | grep -v -i "warn" | tee "$OUT/bench_chunked.txt"
}

windows() {  # spatial rows, and where auto moves a long window from varlen to flex
  timeout 200 python3 benchmarks/bench_users.py --repeat 11 --hand-mask eager --rows natten natten3d vlm 2>&1 \
    | grep -v -i warn | tee "$OUT/bench_users_natten_vlm.txt" | tail -12
  for scale in 2 8 16; do
    timeout 120 python3 benchmarks/bench_users.py --repeat 7 --hand-mask compiled --scale "$scale" --rows window 2>&1 \
      | grep -v -i warn | tee "$OUT/bench_users_window_x$scale.txt" | tail -6
  done
}

tiles() {  # the executor's forward tiles against torch's, where forward is over target
  for tiles in patternc torch; do
    timeout 160 python3 benchmarks/bench_users.py --rows prefix --scale 16 --repeat 10 --forward-tiles $tiles 2>&1 \
      | grep -v -i warn | tee "$OUT/bench_users_tiles_prefix_$tiles.txt" | tail -8
    timeout 160 python3 benchmarks/bench_users.py --rows window --scale 8 --repeat 10 --forward-tiles $tiles 2>&1 \
      | grep -v -i warn | tee "$OUT/bench_users_tiles_window_$tiles.txt" | tail -8
  done
}
diagnose() {  # where a layer's time goes where it is bound by host time
  timeout 300 python3 benchmarks/bench_users.py --diagnose --rows vlm prefix --repeat 20 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_users_diagnose.txt" | tail -60
}

ringrate() {
  # the CUDA tests of the ring's kernels first (the flash-kernel blocks'
  # correctness), then the rate with the blocks that need no mask on the
  # flash kernels forward and backward (auto), and with FlexAttention's
  # forward before the same flash backward (flex)
  local workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
  timeout 240 python3 -m pytest tests/test_distributed_merge.py tests/test_distributed_ring.py -q -p no:cacheprovider "${workers[@]}" 2>&1 \
    | tee "$OUT/test_distributed_ring.txt" | tail -8
  for kernel in auto flex; do
    timeout 200 python3 benchmarks/bench_distributed.py --kernel-rate --worlds 8 --repeat 5 --kernel $kernel 2>&1 \
      | grep -v -i "warn" | tee "$OUT/bench_distributed_kernel_rate_$kernel.txt" | grep "^|"
  done
}

blockkernels() {
  timeout 120 python3 benchmarks/bench_block_kernels.py 2>&1 | grep -v -i warn | tee "$OUT/bench_block_kernels.txt"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests blockmask frames users small large sweep sweep_fp32 step step10k distributed)
for stage in "${stages[@]}"; do
  echo "== $stage"
  "$stage"
done
