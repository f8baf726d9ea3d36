#!/usr/bin/env bash
# For a GPU machine with torch but no network access: patternc's own
# dependencies, and pytest-xdist for gpu_check.sh's tests stage (the GPU test
# files in parallel, since one after another they take the longest of all
# stages). They go to .whl (git-ignored); copy it along with the tree and
# gpu_check.sh installs them.
#   here:         bash benchmarks/device_wheels.sh
#   GPU machine:  bash benchmarks/gpu_check.sh tests
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for p in "pydantic==2.12.5" "pydantic-core==2.41.5" "lark==1.3.1" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "pytest-xdist==3.8.0" "execnet==2.1.2"; do
  python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$p"
done
ls .whl
