#!/usr/bin/env bash
# The wheels the device machine lacks (its image has torch but no network):
# patternc's own dependencies, and pytest-xdist for gpu_check.sh's tests
# stage (the GPU test files in parallel: 2 minutes on a fresh H100 where one
# after another ran past a call's 10-minute limit). They go to .whl
# (git-ignored), which a device call carries; gpu_check.sh installs them.
#   here:    bash benchmarks/device_wheels.sh
#   device:  carry [".whl"]:  bash benchmarks/gpu_check.sh tests
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for p in "pydantic==2.12.5" "pydantic-core==2.41.5" "lark==1.3.1" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "pytest-xdist==3.8.0" "execnet==2.1.2"; do
  python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$p"
done
ls .whl
