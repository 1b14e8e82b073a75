#!/usr/bin/env bash
# Device calls of issue 12 (the whole step's speed), one part per call (each fits one 10-minute
# command); results under $OUT. Usage: bash launch/device_speed.sh PART [PART ...]
#   tests     the GPU tests of the fused kernels, the compiled block and the perf switches (59 tests; past one
#             call's limit since 2026-12-04: run fused and rest in two calls instead)
#   fused     the GPU tests under tests/fused (45; ~450 s)
#   rest      every other GPU test of the suite (33: model, perf switches, memory, rotary, flex, SP, packed rows);
#             fused + rest together are all of `pytest -m gpu tests`
#   suite     the whole GPU suite (`pytest -m gpu tests`: fused + rest) in one call, NW xdist workers on the one
#             GPU (78 tests; default 6 workers: 267 s on an H100, 166 s with the carried compile caches, 2026-12-05; the
#             tests are Triton- and inductor-compile bound on the host; its "2 skipped": the two-GPU SP test and
#             tests/export/test_export_lm_eval.py, which skips at collection without lm-eval; needs the pytest-xdist
#             and execnet wheels in .whl, launch/device_wheels.sh); serial if xdist is missing. The kernel-time test
#             runs alone afterwards (other workers' kernels would count in its wall time)
#   quick     of those, the compiled-op and perf-switch tests only
#   t512      every bias encoding and RoPE (auto, and on SDPA: rope@sdpa) vs the compact peer, 125M, T=512,
#             micro-batch 32
#   t2048     the same at T=2048, micro-batch 8 (PEERS overrides the peer list of t512, t2048, m350, m350s;
#             BENCH_S the timeout of each bench, which with DEADLINE decides which benches of a call run)
#   m350      350M at T=2048, every bias encoding, RoPE (auto and @sdpa) and the compact peer
#   m350s     the same at T=512 (micro-batch 16)
#   attn      the attention kernel table (megafire bench attention), N=4096 and 16384, D=64 and 128; KT=1: GPU kernel
#             time (--kernel-time) instead of wall time (session 7: T5 / FIRE at N=4096 took 1.2-2.4x their
#             N=16384 share of wall time per token: the eager call's host cost, or not? this separates it)
#   attnp     the same on packed rows as the trainer feeds them (2 documents, N=512 and 2048, D=64, H=12),
#             GPU kernel time per call (--kernel-time: the eager calls' host launch cost is not in it)
#   p2048     T5 and FIRE alone at T=2048, one step of each profiled
#   ropefused RoPE with attention.backend=fused (no bias term, dead tiles skipped) at T=512 and 2048,
#             against the compact peer and RoPE on SDPA: whether auto should pick it
#   p350      350M RoPE at T=2048 profiled, with the compact peer (where the 0.93 of 12-04 goes)
#   order     RoPE auto vs SDPA at T=512 in alternating order (arm-order effects)
#   graphs    FIRE and RoPE with perf.cuda_graphs=true at T=512 and 2048 (full logs kept)
#   tune      launch-config tuning of T5 and FIRE on packed rows (2 documents, N=2048, the trainer's
#             D=64, H=12), then the attention table on packed rows at N=512 and 2048 (committed configs)
#   tuned     after tune: T5 and FIRE alone at T=2048 in the trainer, committed configs vs the tuned ones
#   variants  the kernel options of 2026-12-04, each arm alone at 125M T=2048 (then T=512): T5 with `defer` and
#             `segment_bounds` off / defer / both (committed at D=64 since), FIRE with `segment_bounds` (committed)
#             and KU=2 (MEGAFIRE_FUSED_KU; off). VLEN="2048" picks lengths; VARIANTS ("enc KU {config}" items
#             joined by ;) picks the arms; DEADLINE=seconds skips a bench that would end after it
#   vtests    the GPU bf16 tests of T5 / FIRE with every option on (KU=2 too, and at D=128)
#   layouts   (kind nvidia-h200-x2) the issue's DP=2 / TP=2 / PP=2 goal: the 125M FIRE arm in the layouts one,
#             dp2, tp2, pp2 (launch/eight_gpu.sh), as the 2026-11-22 table, at the current trainer (perf switches
#             on where they apply: graphs only at tp = pp = 1)
#   onepass   the one-pass backward (CONFIGS `onepass`, off): packed-row kernel time (N=2048, D=64, H=12, 2
#             documents) with the committed two kernels and each onepass launch config in OCFGS ("BM,BN,warps,stages"
#             items joined by ;), after the GPU bf16 tests at D=64 with the first; then the FIRE / T5 arms in the trainer at T=2048 (OTRAIN=1)
#   opt       the one-pass backward in the trainer (125M, RoPE config with ALiBi / T5 peers), committed (on) against
#             onepass off for every encoding, at OLEN (default 2048)
#   diet      the kernel options of 2026-12-05 (prepared without a GPU; docs/kernels.md; timed and committed since for T5 /
#             FIRE at D=64 by launch/device_options_timed.sh, so `{}` is now their new config): GPU bf16 tests with `rcp_ex2` and
#             `t5_diag` on, then with `fold_mask` off and `split_heavy` on; packed-row kernel time (N=2048, D=64, H=12, 2
#             documents) of DENC (default none,kerple_log,t5,fire) under each DCFGS item ("KU {config}", joined by ;;
#             default: committed, t5_diag, fold_mask off, rcp_ex2, split_heavy + dq 64x64/4/1 at KU 1 and 2, and with
#             rcp_ex2); DTRAIN=1 adds the
#             DTRAIN_ENC arms (default fire) alone in the trainer at T=2048 under each (~90 s per arm and item: give
#             DCFGS at most three items per call then)
#   failing   the GPU tests that failed last time, with their tracebacks (FAILED=node ids)
#   kerple    Kerple-log's miss at 350M T=2048 (0.914x RoPE, session 7): `run_mask` and `rcp_ex2` (prepared for
#             Kerple, never timed there): GPU bf16 tests of Kerple with both on; packed-row kernel time (2 documents,
#             N=512 and 2048, D=64, H=16 as at 350M) committed / run_mask / rcp_ex2 / both; then 350M kerple_log at
#             T=2048 in one process, committed (A) against both on (B), ABBA order (`bench train --ab`); ~400 s
#   kerple512 the same options at T=512: Kerple-log's packed-row kernel time at N=512 (H=16) under each, then
#             125M and 350M kerple_log at T=512, committed (A) against both on (B); ~300 s
#   kpow      Kerple-power's forward tile (committed 128x64 / 4 warps / 3 stages spills 8 B per thread on packed
#             rows, 32 B before the clamp and select went (session 9), `megafire bench resources --encodings
#             kerple_power --documents 2`; 64x64 / 4 / 3 and 128x64 / 8 / 3 do not): GPU bf16 tests of
#             Kerple-power with 64x64 / 4 / 3, packed-row kernel time (2 documents, N=512 and 2048, D=64, H=16)
#             under each, then 350M kerple_power at T=2048, committed (A) against 64x64 / 4 / 3 (B) in one
#             process (KPF overrides B's tile); ~350 s
#   t5d128    T5's kernel goal at D=128 (0.57x SDPA-flash at N=4096 in session 8): its committed D=128 tiles spill
#             (fwd 128x128 / 8 warps 180 B per thread, dkdv 64x64 / 4 warps 828 B: `megafire bench resources
#             --encodings t5 --head-dims 128`) and `t5_diag` / `t5_band` / `run_mask` are untimed there. GPU bf16
#             tests of T5 at D=128 with the last item, then one document's kernel time (N=4096 and 16384, D=128,
#             H=16, as the attention table) under the committed config and each T5D item ("{config}" joined by
#             ;; default: spill-free tiles 128x64/8/2, 64x64/8/2, 32x128/8/2; dkdv 64x32/4/2 alone, with fwd
#             128x64/8/2; the options with the spill-free tiles); ~250 s
#   relaxed   session 9's exact changes to FIRE's and T5's backward, untimed when made: the parameter-sum atomics with
#             `sem="relaxed"` (Triton's default acq_rel put MEMBAR.ALL.GPU + CCTL.IVALL around each inside the tile
#             loops) and two row sums in one reduction (`_sum_pair`). Three trees (launch/kernel_variants.py):
#             kv_old (both undone), kv_sep (the pair undone), new (this one); packed-row kernel time (2 documents,
#             D=64, H=12, N=512 and 2048, T5 and FIRE) and one document at D=128 (N=4096), the three trees twice
#             in turn, then 125M FIRE at T=2048 in the trainer once per tree; ~450 s
#   kp        Kerple-power against RoPE in the trainer at the four shapes (125M / 350M, T=2048 / 512; the main
#             arm configs/arms/*-kerple-power.yaml, peers rope, and at 350M T=2048 alibi and t5 too); ~250 s
# Every call: carry [".whl", ".devcache"]: device_setup.sh restores the last call's compile caches (launch/devcache.py)
# and saves this call's under $OUT (keep them here: python3 launch/devcache.py keep FILES_AT)
. launch/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
T2048="--curriculum.stages=[{seq_len: 2048, tokens: 1000000000}]"
ARMS=${PEERS:-compact,rope,rope@sdpa,alibi,kerple_log,kerple_power,t5}   # the peers of t512, t2048, m350
filter() { grep -vE "warn|Warning|^\s*$|DeprecationWarning|tp_group" ; }
tree_tag() { if [ "$1" = "$PWD" ]; then echo new; else basename "$1"; fi; }   # the relaxed part's trees
bench() {   # tag timeout args...
  local tag=$1 t=${BENCH_S:-$2}; shift 2   # BENCH_S: one timeout for every bench of the call
  if [ $((SECONDS + t)) -gt "${DEADLINE:-100000}" ]; then echo "=== $tag skipped (DEADLINE)"; return; fi
  echo "=== $tag (at ${SECONDS}s)"
  timeout "$t" python3 -m megafire.cli bench train --steps 8 --warmup 3 --train.tokens_per_step=65536 \
     --out "$OUT/$tag.json" "$@" 2>&1 | { if [ -n "$LOG" ]; then tee "$OUT/$tag.log"; else cat; fi; } | filter | grep -E "tokens/s|throughput|profile|ms  |ms .*x  |host|Error|error" | tail -60
}
for part in "$@"; do
  case $part in
    tests) timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused tests/model/test_model_gpu.py \
             tests/train/test_train_perf.py tests/train/test_bench_memory.py tests/positional/test_rotary_triton.py \
             tests/attention/test_bench_packed_rows.py 2>&1 \
             | tee "$OUT/gpu_tests.log" \
             | grep -E "passed|failed|Error|FAIL|error" | tail -30 ;;
    fused) timeout 570 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/fused 2>&1 | tee "$OUT/gpu_fused.log" \
             | grep -E "passed|failed|Error|FAIL|error" | tail -30 ;;
    rest) timeout 570 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests --ignore=tests/fused 2>&1 \
             | tee "$OUT/gpu_rest.log" | grep -E "passed|failed|Error|FAIL|error" | tail -30 ;;
    suite) xd=""; python3 -c "import xdist" 2>/dev/null && xd="-n ${NW:-6}"
           echo "=== GPU suite ${xd:-serial} (at ${SECONDS}s)"
           # the one timing test (kernel time against wall time) runs alone after the others
           solo=tests/attention/test_bench_packed_rows.py::test_kernel_time_excludes_host_gaps
           # -v: each test's outcome by name as it ends ("[gwN] [ k%] PASSED node"), so a run cut by the limit
           # still says what passed (2026-12-05: -q's dots said 71 of 76, not which), and which were not reached
           timeout "${SUITE_S:-560}" python3 -m pytest -v -m gpu -p no:cacheprovider -rfE $xd --deselect "$solo" tests \
             > "$OUT/gpu_suite.log" 2>&1; rc=$?
           grep -oE "(PASSED|FAILED|SKIPPED|ERROR) tests/[^ ]+" "$OUT/gpu_suite.log" | sort -u -k2 > "$OUT/gpu_done.txt"
           grep -E "^(FAILED|ERROR) |passed|failed" "$OUT/gpu_suite.log" | tail -30
           echo "outcomes: $(cut -d' ' -f1 "$OUT/gpu_done.txt" | sort | uniq -c | tr '\n' ' ')"
           if [ "$rc" = 124 ]; then
             echo "cut at ${SUITE_S:-560}s; not reached:"
             python3 -m pytest --collect-only -q -m gpu -p no:cacheprovider --deselect "$solo" tests 2>/dev/null \
               | grep "::" | sort > "$OUT/gpu_ids.txt"
             cut -d' ' -f2 "$OUT/gpu_done.txt" | sort | comm -23 "$OUT/gpu_ids.txt" -
           fi
           timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE "$solo" 2>&1 | tail -2 ;;
    quick) timeout 290 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_compile.py \
             tests/train/test_train_perf.py 2>&1 | tee "$OUT/gpu_quick.log" | grep -E "passed|failed|Error|FAIL|error" | tail -30 ;;
    t512) bench t512 570 --config configs/arms/125m-fire.yaml --peer "$ARMS" ;;
    t2048) bench t2048 570 --config configs/arms/125m-fire.yaml --peer "$ARMS" "$T2048" ;;
    m350) bench m350 570 --config configs/arms/350m-fire.yaml --peer "$ARMS" "$T2048" ;;
    m350s) bench m350_512 570 --config configs/arms/350m-fire.yaml --peer "${PEERS:-compact,rope,alibi,kerple_log,kerple_power,t5}" \
             "--curriculum.stages=[{seq_len: 512, tokens: 1000000000}]" ;;
    attn) timeout 500 python3 -m megafire.bench.attention --seqlens 4096,16384 --head-dims 64,128 ${KT:+--kernel-time} \
             --reference-max-n 0 --json "$OUT/attn.json" 2>&1 | filter | tail -40 ;;
    attnp) timeout 300 python3 -m megafire.bench.attention --seqlens 512,2048 --head-dims 64 --heads 12 \
             --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 --json "$OUT/attnp.json" 2>&1 | filter | tail -24 ;;
    p2048) for e in t5 fire; do bench "p2048_$e" 280 --config "configs/arms/125m-$e.yaml" --peer none "$T2048" \
             --profile "$OUT/p_${e}2048"; done ;;
    ropefused) for t in 512 2048; do   # overrides apply to every arm: RoPE on SDPA is a run of its own
             st="--curriculum.stages=[{seq_len: $t, tokens: 1000000000}]"
             bench "rf$t" 200 --config configs/arms/125m-rope.yaml --peer compact --attention.backend=fused "$st"
             bench "rs$t" 150 --config configs/arms/125m-rope.yaml --peer none "$st"; done ;;
    p350) bench p350 300 --config configs/arms/350m-rope.yaml --peer compact "$T2048" --profile "$OUT/p_rope350" ;;
    order) bench ab512 200 --config configs/arms/125m-rope.yaml --peer rope@sdpa,rope@fused,rope@sdpa ;;
    graphs) LOG=1 bench cg512 170 --config configs/arms/125m-fire.yaml --peer rope --perf.cuda_graphs=true
            LOG=1 bench cg2048 120 --config configs/arms/125m-fire.yaml --peer rope --perf.cuda_graphs=true "$T2048" ;;
    tune) timeout 300 python3 -m megafire.bench.attention --tune --encodings t5,fire --seqlens 2048 --head-dims 64 \
             --heads 12 --tokens 16384 --documents 2 --json "$OUT/tune.json" 2>&1 | filter | tail -60
          timeout 150 python3 -m megafire.bench.attention --seqlens 512,2048 --head-dims 64 --heads 12 --tokens 16384 \
             --documents 2 --reference-max-n 0 --json "$OUT/attn_docs.json" 2>&1 | filter | tail -24 ;;
    tuned) for e in t5 fire; do
             cfg=$(python3 launch/pick_tuned.py "$OUT/tune_tune.json" "$e") || continue; echo "tuned $e: $cfg"
             bench "base_$e" 150 --config "configs/arms/125m-$e.yaml" --peer none "$T2048"
             MEGAFIRE_FUSED_CONFIGS="$cfg" bench "tuned_$e" 150 --config "configs/arms/125m-$e.yaml" --peer none "$T2048"
           done ;;
    variants) dv='t5 1 {"defer":false,"segment_bounds":false};t5 1 {"segment_bounds":false};t5 1 {};fire 1 {"segment_bounds":false};fire 1 {};fire 2 {};fire 2 {"segment_bounds":false}'
             IFS=';' read -ra vs <<< "${VARIANTS:-$dv}"
             for len in ${VLEN:-2048 512}; do
             st="--curriculum.stages=[{seq_len: $len, tokens: 1000000000}]"
             for v in "${vs[@]}"; do
               set -- $v; tag="v${len}_$1_ku$2_$(echo "$3" | tr -cd 'a-z_')"
               MEGAFIRE_FUSED_KU=$2 MEGAFIRE_FUSED_CONFIGS="{\"64\": $3}" bench "$tag" 90 \
                 --config "configs/arms/125m-$1.yaml" --peer none "$st"
             done; done ;;
    vtests) MEGAFIRE_FUSED_KU=2 MEGAFIRE_FUSED_CONFIGS='{"64": {"defer": true, "segment_bounds": true}, "128": {"defer": true, "segment_bounds": true}}' \
             timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py \
             -k "gpu_bf16 and (t5 or fire)" 2>&1 | tail -3 ;;
    layouts) NPROC_PER_NODE=2 MEGAFIRE_PYTHON=python3 timeout 560 bash launch/eight_gpu.sh --steps 30 \
             --out "$OUT/layouts" --config configs/arms/125m-fire.yaml --layouts "one dp2 tp2 pp2" -- \
             --train.tokens_per_step=131072 --train.micro_batch_tokens=16384 --data.corpus=synthetic \
             --tracking.enabled=false 2>&1 | filter | grep -E "tokens/s|layout|rel|MFU|Error|error" | tail -40 ;;
    onepass) IFS=';' read -ra ocs <<< "${OCFGS:-64,64,8,2;64,64,4,2;128,64,8,2}"
             MEGAFIRE_FUSED_CONFIGS="{\"64\": {\"onepass\": [${ocs[0]}]}}" timeout 200 python3 -m pytest -q -m gpu \
               -p no:cacheprovider tests/fused/test_fused_attention.py -k "gpu_bf16 and 64" 2>&1 | tail -3
             for oc in "" "${ocs[@]}"; do
               cfg="{}"; [ -n "$oc" ] && cfg="{\"onepass\": [$oc]}"
               echo "=== onepass ${oc:-off} (at ${SECONDS}s)"
               MEGAFIRE_FUSED_CONFIGS="{\"64\": $cfg}" timeout 240 python3 -m megafire.bench.attention --seqlens 2048 \
                 --head-dims 64 --heads 12 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
                 --encodings "${OENC:-none,alibi,kerple_log,t5,fire}" \
                 --json "$OUT/onepass_${oc//,/x}.json" 2>&1 | filter | grep -E "fused|sdpa|check|max|rel|Error|error" | tail -14
             done
             if [ -n "$OTRAIN" ]; then for e in fire t5; do
               bench "op_base_$e" 100 --config "configs/arms/125m-$e.yaml" --peer none "$T2048"
               MEGAFIRE_FUSED_CONFIGS="{\"64\": {\"onepass\": [${ocs[0]}]}}" bench "op_on_$e" 100 \
                 --config "configs/arms/125m-$e.yaml" --peer none "$T2048"
             done; fi ;;
    opt) for len in ${OLEN:-2048}; do
             st="--curriculum.stages=[{seq_len: $len, tokens: 1000000000}]"
             bench "opt_on_$len" 300 --config configs/arms/125m-rope.yaml --peer compact,alibi,t5 "$st"
             MEGAFIRE_FUSED_CONFIGS='{"64": {"onepass": false}}' bench "opt_off_$len" 200 \
               --config configs/arms/125m-rope.yaml --peer alibi,t5 "$st"
           done ;;
    diet) if [ -z "$DNOTEST" ]; then   # DNOTEST=1: the timing only
          MEGAFIRE_FUSED_CONFIGS='{"64": {"rcp_ex2": true, "t5_diag": true}, "128": {"rcp_ex2": true, "t5_diag": true}}' \
             timeout 150 python3 -m pytest -q \
             -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py -k "gpu_bf16" 2>&1 | tail -2
          MEGAFIRE_FUSED_CONFIGS='{"64": {"fold_mask": false, "split_heavy": true}, "128": {"split_heavy": true}}' \
             timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/fused/test_fused_attention.py \
             -k "gpu_bf16" 2>&1 | tail -2
          fi
          dd='1 {};1 {"t5_diag": true};1 {"fold_mask": false};1 {"rcp_ex2": true};1 {"split_heavy": true, "dq": [64, 64, 4, 1]}'
          dd="$dd;2 {\"split_heavy\": true, \"dq\": [64, 64, 4, 1]};2 {\"split_heavy\": true, \"dq\": [64, 64, 4, 1], \"rcp_ex2\": true}"
          IFS=';' read -ra dcs <<< "${DCFGS:-$dd}"
          for item in "${dcs[@]}"; do
            ku=${item%% *}; dc=${item#* }; tag="ku${ku}_$(echo "$dc" | tr -cd 'a-z_0-9')"
            echo "=== diet KU=$ku $dc (at ${SECONDS}s)"
            MEGAFIRE_FUSED_KU=$ku MEGAFIRE_FUSED_CONFIGS="{\"64\": $dc}" timeout 150 python3 -m megafire.bench.attention \
              --seqlens 2048 --head-dims 64 --heads 12 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
              --encodings "${DENC:-none,kerple_log,t5,fire}" --json "$OUT/diet_$tag.json" 2>&1 | filter \
              | grep -E "fused|sdpa|Error|error" | tail -8
            if [ -n "$DTRAIN" ]; then for e in ${DTRAIN_ENC:-fire}; do
              MEGAFIRE_FUSED_KU=$ku MEGAFIRE_FUSED_CONFIGS="{\"64\": $dc}" bench "diet_${e}_$tag" 90 \
                --config "configs/arms/125m-$e.yaml" --peer none "$T2048"
            done; fi
          done ;;
    failing) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE $FAILED 2>&1 \
             | tee "$OUT/gpu_failing.log" | tail -80 ;;
    kerple) ko='"run_mask": true, "rcp_ex2": true'
          echo "=== Kerple GPU bf16 tests with $ko (at ${SECONDS}s)"
          MEGAFIRE_FUSED_CONFIGS="{\"64\": {$ko}, \"128\": {$ko}}" timeout 150 python3 -m pytest -q -m gpu \
            -p no:cacheprovider tests/fused/test_fused_attention.py -k "gpu_bf16 and kerple" 2>&1 | tail -2
          for it in '{}' '{"run_mask": true}' '{"rcp_ex2": true}' "{$ko}"; do
            echo "=== Kerple kernel time $it (at ${SECONDS}s)"
            MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 90 python3 -m megafire.bench.attention --seqlens 512,2048 \
              --head-dims 64 --heads 16 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
              --encodings kerple_log,kerple_power 2>&1 | filter | grep -E "fused|sdpa|Error|error" | tail -6
          done
          bench kab350 300 --config configs/arms/350m-kerple-log.yaml --repeat 1 \
            --ab "--attention.fused_kernels.64.run_mask=true --attention.fused_kernels.64.rcp_ex2=true" "$T2048" ;;
    kerple512) ko='"run_mask": true, "rcp_ex2": true'   # the kerple part's options at T=512 (session 8)
          for it in '{}' '{"run_mask": true}' '{"rcp_ex2": true}' "{$ko}"; do
            echo "=== Kerple-log kernel time N=512 $it (at ${SECONDS}s)"
            MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 90 python3 -m megafire.bench.attention --seqlens 512 \
              --head-dims 64 --heads 16 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
              --encodings kerple_log 2>&1 | filter | grep -E "^B=|fused|sdpa|Error|error" | tail -6
          done
          for m in 125m 350m; do
            bench "kab512_$m" 200 --config "configs/arms/$m-kerple-log.yaml" --repeat 1 \
              --ab "--attention.fused_kernels.64.run_mask=true --attention.fused_kernels.64.rcp_ex2=true" \
              "--curriculum.stages=[{seq_len: 512, tokens: 1000000000}]"
          done ;;
    kpow) kf=${KPF:-[64, 64, 4, 3]}
          echo "=== Kerple-power GPU bf16 tests with fwd $kf (at ${SECONDS}s)"
          MEGAFIRE_FUSED_CONFIGS="{\"64\": {\"fwd\": $kf}}" timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
            tests/fused/test_fused_attention.py -k "gpu_bf16 and kerple_power and 64" 2>&1 | tail -2
          for it in '{}' '{"fwd": [64, 64, 4, 3]}' '{"fwd": [128, 64, 8, 3]}'; do
            echo "=== Kerple-power kernel time $it (at ${SECONDS}s)"
            MEGAFIRE_FUSED_CONFIGS="{\"64\": $it}" timeout 90 python3 -m megafire.bench.attention --seqlens 512,2048 \
              --head-dims 64 --heads 16 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
              --encodings kerple_power 2>&1 | filter | grep -E "^B=|fused|sdpa|Error|error" | tail -6
          done
          bench kpab350 240 --config configs/arms/350m-kerple-power.yaml --repeat 1 \
            --ab "--attention.fused_kernels.64.fwd=${kf// /}" "$T2048" ;;
    relaxed) python3 launch/kernel_variants.py /tmp/kv_old relaxed pair && python3 launch/kernel_variants.py /tmp/kv_sep pair \
            || { echo "relaxed: no variant trees"; continue; }
          for rep in 1 2; do for tree in /tmp/kv_old /tmp/kv_sep "$PWD"; do
            tag=$(tree_tag "$tree")
            echo "=== $tag: packed rows D=64, then one document D=128 (rep $rep, at ${SECONDS}s)"
            (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 120 python3 -m megafire.bench.attention --seqlens 512,2048 \
              --head-dims 64 --heads 12 --tokens 16384 --documents 2 --kernel-time --reference-max-n 0 \
              --encodings t5,fire --json "$OUT/rx_${tag}_$rep.json" 2>&1 | filter | grep -E "^B=|fused|Error|error" | tail -6
             PYTHONPATH=/tmp/site:$tree timeout 120 python3 -m megafire.bench.attention --seqlens 4096 --head-dims 128 \
              --kernel-time --reference-max-n 0 --encodings t5,fire --json "$OUT/rx128_${tag}_$rep.json" 2>&1 \
              | filter | grep -E "^B=|fused|Error|error" | tail -4)
          done; done
          for tree in /tmp/kv_old /tmp/kv_sep "$PWD"; do
            tag=$(tree_tag "$tree")
            (cd "$tree" && PYTHONPATH=/tmp/site:$tree bench "rx_fire_$tag" 90 --config configs/arms/125m-fire.yaml \
              --peer none "$T2048")
          done ;;
    kp) for m in 125m 350m; do for len in 2048 512; do
            pe=rope; [ "$m$len" = 350m2048 ] && pe=rope,alibi,t5
            bench "kp_${m}_$len" 200 --config "configs/arms/$m-kerple-power.yaml" --peer "$pe" \
              "--curriculum.stages=[{seq_len: $len, tokens: 1000000000}]"
          done; done ;;
    t5d128) d5='{"fwd": [128, 64, 8, 2], "dq": [64, 64, 8, 2], "dkdv": [32, 128, 8, 2]};{"dkdv": [64, 32, 4, 2]}'
          d5="$d5;{\"fwd\": [128, 64, 8, 2], \"dkdv\": [64, 32, 4, 2]}"
          d5="$d5;{\"t5_diag\": true, \"t5_band\": true, \"run_mask\": true, \"fwd\": [128, 64, 8, 2], \"dq\": [64, 64, 8, 2], \"dkdv\": [32, 128, 8, 2]}"
          IFS=';' read -ra t5s <<< "${T5D:-$d5}"
          echo "=== T5 D=128 GPU bf16 tests with ${t5s[-1]} (at ${SECONDS}s)"
          MEGAFIRE_FUSED_CONFIGS="{\"128\": ${t5s[-1]}}" timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider \
            tests/fused/test_fused_attention.py -k "gpu_bf16 and t5 and 128" 2>&1 | tail -2
          for it in '{}' "${t5s[@]}"; do
            echo "=== T5 D=128 kernel time $it (at ${SECONDS}s)"
            MEGAFIRE_FUSED_CONFIGS="{\"128\": $it}" timeout 120 python3 -m megafire.bench.attention --seqlens 4096,16384 \
              --head-dims 128 --kernel-time --reference-max-n 0 --encodings t5 \
              --json "$OUT/t5d128_$(echo "$it" | tr -cd 'a-z_').json" 2>&1 | filter | grep -E "^B=|fused|sdpa|Error|error" | tail -6
          done ;;
    *) echo "unknown part $part" ;;
  esac
done
ls "$OUT"
