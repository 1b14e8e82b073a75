#!/usr/bin/env bash
# Set-up on a lent GPU machine (no registry there): install the wheels carried in .whl/
# (deepspeed, megatron-core, webdataset and their pure-Python needs; see docs/benchmarks.md)
# into /tmp/site and put it and the repo on PYTHONPATH. Source it: `. launch/device_setup.sh`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "device_setup: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/inductor/triton
# The compile caches of the last call (launch/devcache.py: carried in .devcache/), saved again under $OUT
# when the sourcing script exits: the next call compiles only what changed
python3 launch/devcache.py restore .devcache
[ -n "$OUT" ] && [ -z "$DEVCACHE_OFF" ] && trap 'python3 launch/devcache.py save "$OUT"' EXIT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
