#!/usr/bin/env bash
# Device calls (nvidia-h200; carry .whl) that time T5's `t5_band` (prepared without a GPU, off; docs/kernels.md
# "T5's heavy tiles from band tables") and the mask skips it makes cheaper, one part per call (each < 10 min):
#   kernel  GPU tests (band against the gather and float64 at D=64 / 128; the T5 bf16 tests with band on), then
#           packed-row kernel time (2 documents, D=64, H=12, 16,384 tokens per call) at N=2048 and 512 for each
#           ITEMS entry (joined by ;; default: committed, band, band + skip_fwd, band + both skips); ~420 s
#   train   T5 alone in the trainer (125M, 16,384 tokens per micro-batch: 8 x 2048, 32 x 512) at T=2048 and T=512
#           under each TITEMS entry (default: committed, band,
#           band + skip_fwd + skip_bwd; ~75 s per arm and item); ~480 s
# Usage: bash launch/device_t5_band.sh PART [PART ...]; DEADLINE=seconds skips a step that would end after it.
. launch/device_setup.sh || exit 1
set -o pipefail
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
BAND='"t5_band": true'
ITEMS=${ITEMS:-"{};{$BAND};{$BAND, \"skip_fwd\": true};{$BAND, \"skip_fwd\": true, \"skip_bwd\": true}"}
TITEMS=${TITEMS:-"{};{$BAND};{$BAND, \"skip_fwd\": true, \"skip_bwd\": true}"}
late() { [ $((SECONDS + $1)) -gt "${DEADLINE:-100000}" ] && echo "=== skipped (DEADLINE): $2"; }
for part in "$@"; do
  case $part in
    kernel)
      echo "=== GPU tests: band vs gather and float64 (at ${SECONDS}s)"
      timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py \
        -k "t5_band_gpu" 2>&1 | tee "$OUT/band_tests.log" | tail -3
      echo "=== GPU tests: T5 bf16 with band on at D=64 and 128 (at ${SECONDS}s)"
      MEGAFIRE_FUSED_CONFIGS="{\"64\": {$BAND}, \"128\": {$BAND}}" timeout 100 python3 -m pytest -q -m gpu \
        -p no:cacheprovider tests/fused/test_fused_attention.py -k "gpu_bf16 and t5" 2>&1 \
        | tee "$OUT/bf16_tests.log" | tail -3
      IFS=';' read -ra items <<< "$ITEMS"
      for it in "${items[@]}"; do
        tag=$(echo "$it" | tr -cd 'a-z_'); tag=${tag:-committed}
        late 70 "kernel $it" && continue
        echo "=== kernel time $it (at ${SECONDS}s)"
        MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 90 python3 -m megafire.bench.attention --seqlens 512,2048 \
          --head-dims 64 --heads 12 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
          --encodings t5 --json "$OUT/k_$tag.json" 2>&1 | grep -E "fused|sdpa|Error|error" | tail -6
      done ;;
    train)
      IFS=';' read -ra items <<< "$TITEMS"
      for len in 2048 512; do
        for it in "${items[@]}"; do
          tag=t5_${len}_$(echo "$it" | tr -cd 'a-z_'); late 80 "$tag" && continue
          echo "=== $tag $it (at ${SECONDS}s)"
          MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 80 python3 -m megafire.cli bench train --steps 8 --warmup 3 \
            --train.tokens_per_step=65536 --out "$OUT/$tag.json" --config configs/arms/125m-t5.yaml --peer none \
            "--curriculum.stages=[{seq_len: $len, tokens: 1000000000}]" 2>&1 \
            | grep -E "tokens/s|throughput|Error|error" | grep -v -i warn | tail -6
        done
      done ;;
    *) echo "unknown part $part" ;;
  esac
done
