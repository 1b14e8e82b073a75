#!/usr/bin/env bash
# Third GPU call of the study (issue 14): only the ablations added after the published results
# (docs/study.json), 7 runs at once on the one GPU; results under $OUT (study_results.tar.gz,
# study.json/md/png of these runs). Carries .whl and study_data/gpu.
#   fire_enc_lr10-s1235     the key result's second seed (its seed spread)
#   fire_enc_lr30           the encoding's learning rate one step further (30x)
#   fire_s_enc_lr10, t5_enc_lr10   do the other learned biases gain from 10x as FIRE did?
#   fire_enc_fp32           precision: FIRE's own parameters and gradients fp32 under bf16
#   fire_enc_lr10_half, alibi_half   token budget: half the tokens (10,485,760), vs the 1x runs
# Estimate from docs/study.json's measured runs (aggregate ~660-725k tokens/s with 4-8 runs on the
# GPU, ~50-80 s start-up per run, 55-90 s evaluation per run when they share): 126M tokens ->
# ~180-190 s of steps + ~70 s start-up + ~85 s evaluation + ~35 s set-up/export = ~6.3-7.5 min,
# inside one call's --wait. Safe to call twice in a row: a second call follows the runner the
# first one detached (or, once it is done, rebuilds the report and exports: nothing is
# retrained); on a fresh machine (/tmp empty) it starts over.
# Afterwards, on the CPU side: megafire study report --out study_out --merge docs/study.json
#   --from-tarball $OUT/study_results.tar.gz --plan configs/study/plan.yaml [--publish docs ...]
if [ -f /tmp/site/.call3_installed ]; then
  # a second call while the first one's runner works: its train / eval processes import from
  # /tmp/site, so do not reinstall under them; take device_setup.sh's environment only
  eval "$(grep '^export ' launch/device_setup.sh)"
else
  . launch/device_setup.sh || exit 1
  touch /tmp/site/.call3_installed
fi
ARMS="t5_enc_lr10,fire_s_enc_lr10,fire_enc_lr10-s1235,fire_enc_lr30,fire_enc_fp32,fire_enc_lr10_half,alibi_half"
STUDY=/tmp/study3                 # run directories (checkpoints stay on the machine)
DATA=/tmp/study3_data             # the study data outside the checkout, which a lent machine re-syncs
if [ ! -f $DATA/study_data/gpu/study_data.json ]; then
  rm -rf $DATA.tmp && mkdir -p $DATA.tmp/study_data && cp -r study_data/gpu $DATA.tmp/study_data/ \
    && rm -rf $DATA && mv $DATA.tmp $DATA || { echo "call3: copying study_data/gpu failed" >&2; exit 1; }
fi
WAIT=$(( ${STUDY_WAIT:-540} - SECONDS ))   # the set-up above counts against the call's time
python3 -m megafire.cli study run --plan configs/study/plan.yaml --arms "$ARMS" --out $STUDY \
  --data-root $DATA --shards-dir $DATA/shards/train --export-dir $OUT --concurrency 8 \
  --detach --wait $(( WAIT > 30 ? WAIT : 30 )) 2>&1 | grep -vE "warn|Warning|^\s*$" | tail -30
rc=${PIPESTATUS[0]}
echo "=== study run exit $rc (0: all done, 3: still running: call again, 1: a job failed)"
python3 -m megafire.cli study status --out $STUDY --log-lines 0 2>&1 | grep -vE "warn|Warning"
exit $rc
