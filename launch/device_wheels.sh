#!/usr/bin/env bash
# Build .whl/ here (the CPU machine) for the lent GPU machine, which has no registry: the packages
# its image lacks (deepspeed, megatron-core, webdataset) and their pure-Python needs, at the
# versions of ci/constraints.txt, for CPython 3.12 x86_64 (the GPU image's Python). msgpack,
# ninja, nvidia-ml-py, einops, psutil are in the image already. Then carry `.whl` and start the
# device command with `. launch/device_setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { grep -i "^$1==" ci/constraints.txt; }
P=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${P[@]}" -d .whl $(pin megatron-core) $(pin webdataset) $(pin braceexpand) \
  $(pin pytest-xdist) $(pin execnet) $(pin pydantic) $(pin pydantic_core) $(pin annotated-types) $(pin typing-inspection) $(pin hjson) $(pin py-cpuinfo)
# deepspeed is an sdist only; with DS_BUILD_OPS=0 (its default) the wheel is pure Python
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl $(pin deepspeed)
ls .whl
