#!/usr/bin/env bash
# Fetch, into .whl/, the wheels that scripts/gpu_check.sh needs on a GPU machine that has only
# Python + PyTorch with CUDA and no network (e.g. a short device lease): megatron-core and the few
# packages the benchmark imports besides torch, at the versions of envs/requirements.lock.txt.
# gpu_check.sh installs .whl/*.whl into /tmp/site first; carry .whl with the working tree.
#
# Usage (repository root, on a machine with PyPI access):
#     bash scripts/gpu_wheels.sh            # for the GPU machine's Python, default 3.12
#     bash scripts/gpu_wheels.sh 3.11
set -euo pipefail
py=${1:-3.12}
packages=(megatron-core PyYAML attrs idna jsonschema jsonschema-specifications referencing rpds-py
          tokenizers zstandard typing_extensions)
pins=()
for name in "${packages[@]}"; do
    pin=$(grep -i "^${name}==" envs/requirements.lock.txt) || { echo "gpu_wheels: $name is not in envs/requirements.lock.txt" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "${pins[@]}"
ls -1 .whl
