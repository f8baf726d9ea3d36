#!/usr/bin/env bash
# FlashAttention 4 for a GPU machine without network access: download the
# wheels here and split them into two folders, .fa4a and .fa4b (git-ignored),
# each under 64 MiB for transfers limited to that size (the CuTe DSL compiler
# wheel alone is 92 MB).
#   here:         bash benchmarks/fa4_wheels.sh
#   GPU machine:  with .fa4a copied over:  bash benchmarks/fa4_wheels.sh stage
#                 then with .fa4b and .whl copied over (same machine, /tmp kept):
#                 bash benchmarks/fa4_wheels.sh install && export PYTHONPATH=...  (printed)
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=/tmp/fa4parts
case "${1:-download}" in
download)
  dl=$(mktemp -d)
  for p in "flash-attn-4==4.0.0b36" nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "cuda-bindings>=13,<14" \
      cuda-pathfinder protobuf einops "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext "quack-kernels>=0.5.3"; do
    python3 -m pip download -q --no-deps -d "$dl" --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$p"
  done
  rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
  split -b 48234496 -d "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl .fa4a/libs.part.
  mv .fa4a/libs.part.01 .fa4b/
  mv "$dl"/apache_tvm_ffi-*.whl .fa4a/  # cuda-bindings goes with .fa4b: .fa4a, .whl and the tree stay under 64 MiB
  rm "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl && mv "$dl"/*.whl .fa4b/
  du -sh .fa4a .fa4b ;;
stage)
  mkdir -p "$PARTS" && cp .fa4a/* "$PARTS"/ ;;
install)
  cp .fa4b/* "$PARTS"/ && cd "$PARTS"
  cat libs.part.00 libs.part.01 > nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl && rm libs.part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site ./*.whl
  # --target skips the package's .pth file, which puts its DSL packages on the path
  echo "export PYTHONPATH=\$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages" ;;
*) echo "usage: $0 [download|stage|install]" >&2; exit 2 ;;
esac
