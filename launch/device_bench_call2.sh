#!/usr/bin/env bash
# One device call: every encoding's step at 125M / T=512 against the compact peer (FIRE
# profiled), then the study (configs/study) started detached; results under $OUT.
. launch/device_setup.sh || exit 1
STUDY_WAIT=${STUDY_WAIT:-300}
B="timeout 420 python3 -m megafire.cli bench train --steps 8 --warmup 3 --train.tokens_per_step=65536"
$B --config configs/arms/125m-fire.yaml --peer compact,rope,alibi,kerple_log,t5 --profile $OUT/p_fire \
   --out $OUT/bench125.json 2>&1 | grep -vE "warn|Warning|^\s*$" | grep -E "tokens/s|throughput|profile|ms  |Error" | tail -40
python3 -m megafire.cli study run --plan configs/study/plan.yaml --out /tmp/study --export-dir $OUT \
   --detach --wait $STUDY_WAIT 2>&1 | tail -15
