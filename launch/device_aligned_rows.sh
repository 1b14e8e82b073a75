#!/usr/bin/env bash
# Device calls (nvidia-h200; carry .whl) that time the options prepared without a GPU on 2026-12-05 (session 4;
# docs/kernels.md "Aligned rows"): T5's `t5_band` and, for every encoding, `run_mask`, and the mask skips for T5,
# one part per call (each < 10 min). Since session 5 both are committed for T5 at D=64: `{}` is the committed
# configuration and OFF ('"t5_band": false, "run_mask": false') the one before them.
#   tests   GPU tests (band / run mask against the full paths and float64); ~200 s
#   kernel  T5's packed-row kernel time (2 documents, D=64, H=12, 16,384 tokens per call) at N=2048 and 512 for
#           each ITEMS entry (joined by ;; default: OFF, committed, band alone, committed + both skips); ~280 s
#   others  packed-row kernel time of none, ALiBi, Kerple-log, FIRE at N=512 and 2048, committed vs run_mask; ~200 s
#   long    the ITEMS' T5 kernel time on one-document rows at N=4096 and 16384 (D=64, H=12; the issue's
#           >= 0.8x SDPA-flash goal: band tiles are few there, the mask is on every T5 tile); ~300 s
#   train   T5 alone in the trainer (125M, 16,384 tokens per micro-batch: 8 x 2048, 32 x 512) at T=2048 and T=512
#           under each TITEMS entry (default: OFF, committed, committed + both skips); ~480 s
#   trainab T5 alone in the trainer at T=2048 and 512, committed (A) against OFF (B) in one process each, ABBA order
#           (`megafire bench train --ab`; REPEAT pairs, default 2): the medians, the pairs' B / A ratios and their
#           range, which separate processes on a noisy host cannot give (2026-12-05: one arm varied by 22%); ~420 s
#   trainr  125M at T=512 in one process, RoPE with the compact peer and ALiBi, FIRE: committed, then run_mask
#           (a second process); ~450 s
# Usage: bash launch/device_aligned_rows.sh PART [PART ...]; DEADLINE=seconds skips a step that would end after it.
. launch/device_setup.sh || exit 1
set -o pipefail
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
BAND='"t5_band": true'
RUN='"run_mask": true'
SKIPS='"skip_fwd": true, "skip_bwd": true'
OFF='"t5_band": false, "run_mask": false'
ITEMS=${ITEMS:-"{$OFF};{};{$BAND, \"run_mask\": false};{$SKIPS}"}
TITEMS=${TITEMS:-"{$OFF};{};{$SKIPS}"}
late() { [ $((SECONDS + $1)) -gt "${DEADLINE:-100000}" ] && echo "=== skipped (DEADLINE): $2"; }
ktime() {  # tag config encodings seqlens documents tokens
  MEGAFIRE_FUSED_CONFIGS="{\"64\": $2}" timeout 100 python3 -m megafire.bench.attention --seqlens "$4" \
    --head-dims 64 --heads 12 --tokens "$6" --documents "$5" --kernel-time --reference-max-n 0 \
    --encodings "$3" --json "$OUT/k_$1.json" 2>&1 | grep -E "fused|sdpa|Error|error" | tail -10
}
t5_items() {  # prefix label seconds-needed seqlens documents tokens: T5's kernel time under each ITEMS entry
  local it tag items
  IFS=';' read -ra items <<< "$ITEMS"
  for it in "${items[@]}"; do
    tag=$(echo "$it" | tr -cd 'a-z_'); tag=${tag:-committed}
    late "$3" "$1 $it" && continue
    echo "=== $2 $it (at ${SECONDS}s)"
    ktime "$1_$tag" "$it" t5 "$4" "$5" "$6"
  done
}
for part in "$@"; do
  case $part in
    tests)
      echo "=== GPU tests: band / run mask vs the full paths and float64 (at ${SECONDS}s)"
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py \
        -k "t5_band_gpu or run_mask_gpu" 2>&1 | tee "$OUT/new_tests.log" | tail -3 ;;
    kernel) t5_items t5 "T5 kernel time" 70 512,2048 2 16384 ;;
    others)
      for it in "{}" "{$RUN}"; do
        tag=$(echo "$it" | tr -cd 'a-z_'); tag=${tag:-committed}
        late 90 "others $it" && continue
        echo "=== kernel time none, alibi, kerple_log, fire $it (at ${SECONDS}s)"
        ktime "others_$tag" "$it" none,alibi,kerple_log,fire 512,2048 2 16384
      done ;;
    long) t5_items long "T5 kernel time, one document," 80 4096,16384 1 65536 ;;
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
    trainab)
      for len in 2048 512; do
        tag=ab_t5_$len; late 200 "$tag" && continue
        echo "=== $tag: A committed, B off (at ${SECONDS}s)"
        timeout 260 python3 -m megafire.cli bench train --steps 16 --warmup 4 --train.tokens_per_step=65536 \
          --out "$OUT/$tag.json" --config configs/arms/125m-t5.yaml --repeat "${REPEAT:-2}" \
          --ab "--attention.fused_kernels.64.t5_band=false --attention.fused_kernels.64.run_mask=false" \
          "--curriculum.stages=[{seq_len: $len, tokens: 1000000000}]" 2>&1 \
          | grep -E "tokens/s|B/A|A/B|Error|error" | grep -v -i warn | tail -8
      done ;;
    trainr)
      for it in "{}" "{$RUN}"; do
        tag=t512_$(echo "$it" | tr -cd 'a-z_'); late 220 "$tag" && continue
        echo "=== $tag $it (at ${SECONDS}s)"
        MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 220 python3 -m megafire.cli bench train --steps 8 --warmup 3 \
          --train.tokens_per_step=65536 --out "$OUT/$tag.json" --config configs/arms/125m-rope.yaml \
          --peer compact,alibi,fire "--curriculum.stages=[{seq_len: 512, tokens: 1000000000}]" 2>&1 \
          | grep -E "tokens/s|throughput|Error|error" | grep -v -i warn | tail -8
      done ;;
    *) echo "unknown part $part" ;;
  esac
done
