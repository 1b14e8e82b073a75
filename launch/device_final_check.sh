#!/usr/bin/env bash
# One device call (nvidia-h200, ~470 s; carry .whl): the committed code's T5 / FIRE GPU tests, 125M at
# T=2048 against the compact peer (RoPE, T5, FIRE in one process), then the other GPU tests of the fused
# kernels, the perf switches and the model as far as the call's time goes (docs/benchmarks.md, 2026-12-05).
. launch/device_setup.sh || exit 1
set -o pipefail
T2048="--curriculum.stages=[{seq_len: 2048, tokens: 1000000000}]"
echo "=== gpu_bf16, committed T5 / FIRE (at ${SECONDS}s)"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py \
  -k "gpu_bf16 and (t5 or fire)" 2>&1 | tee "$OUT/g1.log" | tail -3
echo "=== gpu_bf16, T5 D=128 with t5_diag (at ${SECONDS}s)"
MEGAFIRE_FUSED_CONFIGS='{"128": {"t5_diag": true}}' timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/fused/test_fused_attention.py -k "gpu_bf16 and t5 and 128" 2>&1 | tee "$OUT/g2.log" | tail -3
echo "=== 125M T=2048 (at ${SECONDS}s)"
timeout 170 python3 -m megafire.cli bench train --steps 8 --warmup 3 --train.tokens_per_step=65536 \
  --out "$OUT/tr2048.json" --config configs/arms/125m-rope.yaml --peer compact,t5,fire "$T2048" 2>&1 \
  | grep -E "tokens/s|throughput|Error|error" | grep -v -i warn | tail -20
left=$((${DEADLINE:-440} - SECONDS)); echo "=== other GPU tests, ${left}s (at ${SECONDS}s)"
[ $left -gt 30 ] && timeout $left python3 -m pytest -q -m gpu -p no:cacheprovider -k "not gpu_bf16" tests/fused \
  tests/train/test_train_perf.py tests/model/test_model_gpu.py 2>&1 | tee "$OUT/g3.log" | grep -E "passed|failed|FAIL|Error" | tail -20
