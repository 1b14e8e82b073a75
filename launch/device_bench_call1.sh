#!/usr/bin/env bash
# One device call: the trainer's step before/after the perf switches against the compact peer
# (125M, T=512, 131k tokens per step), with profiles. Writes under $OUT.
. launch/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
B="timeout 170 python3 -m megafire.cli bench train --steps 10 --warmup 4 --train.tokens_per_step=131072"
OFF="--perf.compile=false --perf.fused_loss=false --perf.direct_linear=false"
R=configs/arms/125m-rope.yaml; F=configs/arms/125m-fire.yaml
run() { local tag=$1; shift; echo "=== $tag: $*"; "$@" 2>&1 | grep -vE "warn|Warning|^\s*$" | tail -25; }
run rope_today $B --config $R --peer compact $OFF --attention.backend=sdpa --profile $OUT/p_rope_off --out $OUT/rope_off.json
run rope_new $B --config $R --peer none --profile $OUT/p_rope_on --out $OUT/rope_on.json
run rope_new_nodoc $B --config $R --peer none --attention.document_mask=false --out $OUT/rope_nodoc.json
run fire_today $B --config $F --peer none $OFF --out $OUT/fire_off.json
run fire_new $B --config $F --peer none --profile $OUT/p_fire_on --out $OUT/fire_on.json
cd $OUT && tar czf call1.tgz --remove-files *.json p_* && ls -la $OUT
