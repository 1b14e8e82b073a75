#!/usr/bin/env bash
# One device call (nvidia-h200, ~300 s; carry .whl): the kernel options of 2026-12-05 against the configs
# they replaced, as committed in 3d08186 (docs/benchmarks.md, "Kernel options timed"). T5 at D=64 before:
# t5_diag off; FIRE at D=64 before: one dq launch 64x64/4/2 with the Newton reciprocal, KU=1. Then the GPU
# bf16 tests of T5 / FIRE with the options on (D=128 T5 with t5_diag forced). Usage: bash launch/device_options_timed.sh
. launch/device_setup.sh || exit 1
set -o pipefail
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
T2048="--curriculum.stages=[{seq_len: 2048, tokens: 1000000000}]"
T5_OLD='"t5_diag": false'
FIRE_OLD='"split_heavy": false, "rcp_ex2": false, "dq": [64, 64, 4, 2]'
echo "=== GPU bf16 tests, T5 (t5_diag at D=64 and 128) / FIRE (D=64) (at ${SECONDS}s)"
MEGAFIRE_FUSED_CONFIGS='{"128": {"t5_diag": true}}' timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/fused/test_fused_attention.py -k "gpu_bf16 and (t5 or (fire and 64))" 2>&1 | tee "$OUT/tests.log" | tail -3
# items "KU {D=64 override}": both old; T5 new (FIRE old); FIRE new (T5's numbers there are at KU=2)
for item in "1 {$T5_OLD, $FIRE_OLD}" "1 {$FIRE_OLD}" "2 {}"; do
  ku=${item%% *}; dc=${item#* }; tag="ku${ku}_$(echo "$dc" | tr -cd 'a-z_0-9')"
  echo "=== kernel time KU=$ku $dc (at ${SECONDS}s)"
  MEGAFIRE_FUSED_KU=$ku MEGAFIRE_FUSED_CONFIGS="{\"64\": $dc}" timeout 100 python3 -m megafire.bench.attention \
    --seqlens 2048 --head-dims 64 --heads 12 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
    --encodings t5,fire --json "$OUT/k_$tag.json" 2>&1 | grep -E "fused|sdpa|Error|error" | tail -4
done
train() {  # tag timeout KU override args...: 125M at T=2048, one process
  local tag=$1 t=$2 ku=$3 cfg=$4; shift 4
  echo "=== $tag (at ${SECONDS}s)"
  MEGAFIRE_FUSED_KU=$ku MEGAFIRE_FUSED_CONFIGS="$cfg" timeout "$t" python3 -m megafire.cli bench train --steps 8 \
    --warmup 3 --train.tokens_per_step=65536 --out "$OUT/$tag.json" "$@" "$T2048" 2>&1 \
    | grep -E "tokens/s|throughput|Error|error" | grep -v -i warn | tail -20
}
train rope_t5_new 170 1 '{}' --config configs/arms/125m-rope.yaml --peer t5
train t5_old 95 1 "{\"64\": {$T5_OLD}}" --config configs/arms/125m-t5.yaml --peer none
train fire_new 95 2 '{}' --config configs/arms/125m-fire.yaml --peer none
train fire_old 95 1 "{\"64\": {$FIRE_OLD}}" --config configs/arms/125m-fire.yaml --peer none
