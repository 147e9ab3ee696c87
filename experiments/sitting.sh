#!/usr/bin/env bash
# One GPU sitting of the reproduction on a lent machine that is given back ~30 s after each call ends: the
# runs go on in the background only while calls keep coming, so `wait` is a call of its own (≤ 10 min) and
# `collect` packs the run records into ≤ 15 MiB parts to bring back before the machine goes.
#
# What the sittings so far taught (December 2026, one H200):
# - Every call re-copies the working tree into the device's checkout. A suite or a queue running from that
#   checkout can import a half-copied file (the first full-suite run lost one test to "No module named
#   model.load"). So `suite` and `start` run from a snapshot, /work/snap, taken once.
# - `pkill -f PATTERN` also matches the shell of the call that runs it (its command line holds PATTERN):
#   write the pattern as "[t]rain.py ..." so it cannot match itself. `hold` stops new launches safely.
# - Six SmolLM2 runs at once took 7.6 (LoRA) to 14.6 (Echo-DoRA) minutes to train, the eval of each ~2;
#   the GPU suite beside them took 20 minutes (about 8 alone). Runs still training when the machine goes
#   are lost (checkpoints are too big to bring back), so near the end `hold`, then collect.
#
#   here:   split -b 49M ../shared/models/smollm2-135m-instruct/*.gguf .cache/gguf.part.   (aa -> .cache/x1, ab -> .cache/x2)
#           tar -cJf .cache/x2/shared.tar.xz -C .. --exclude=shared/models/smollm2-135m-instruct shared
#   call 1: bash experiments/sitting.sh setup1            (carry .cache/x1)
#   call 2: COMMIT=<hash> bash experiments/sitting.sh go    (carry .cache/x2: setup2, suite, ONLY= runs, startpack;
#                                                          on a machine of several GPUs: the suite alone on GPU 0,
#                                                          nf4bench and packbench each alone on a GPU from 4 GPUs,
#                                                          the rest of the queue (seeds 1-2 first) and startpack /
#                                                          startnf4 on the others, PER_GPU=3 runs per GPU)
#   or:     bash experiments/sitting.sh setup2 && bash experiments/sitting.sh start --only main --jobs 6
#                                                          (carry .cache/x2; the committed runs are skipped; of
#                                                          the sweep only lora-e3-lr0.001 is new: its 1-epoch
#                                                          points are results/smollm2-135m/recipe-sweep's)
#           COMMIT=<hash> bash experiments/sitting.sh suite    (the GPU suite in the background, into /work/gpu-suite.txt)
#           bash experiments/sitting.sh startpack         (issue 30: lora-s0 with --pack, into /work/paper-runs-pack)
#           bash experiments/sitting.sh startnf4          (issue 32: lora-s0, echo-lora-s0 on an NF4 base, into
#                                                          /work/paper-runs-nf4; NF4=1 with go starts them too)
#           bash experiments/sitting.sh packbench         (issue 30's kernel and tok/s records; GPU alone, ~20 min)
#           bash experiments/sitting.sh nf4bench          (issue 24's NF4 / checkpointing benchmark, in the background)
#   calls:  bash experiments/sitting.sh wait 540          (back to back: a gap over ~30 s loses the machine)
#           bash experiments/sitting.sh status            (suite, benchmark, runs and GPU at a glance)
#           bash experiments/sitting.sh hold              (no new runs; those running finish)
#           bash experiments/sitting.sh teacher           (the teacher probe, once echo-lora-s0 is done)
#   last:   bash experiments/sitting.sh collect           (then, here: bash experiments/sitting.sh ingest FILES_AT
#                                                          copies each finished run of paper-runs/ into
#                                                          results/smollm2-135m-paper-recipe/runs/, of paper-runs-sweep/
#                                                          into …/sweep/, of paper-runs-X/ into …/X-runs/, with the
#                                                          machine's paths rewritten; python -m experiments.reproduce --only-table;
#                                                          nf4-bench.jsonl -> results/speed/nf4-bench-<gpu>.jsonl, then
#                                                          python -m experiments.nf4_table; pack-bench.tar unpacks into
#                                                          results/, then python -m experiments.pack_speed --only-table;
#                                                          paper-runs-pack/lora-s0-pack -> …/pack-runs/, then
#                                                          python -m experiments.pack_accuracy; paper-runs-nf4/* ->
#                                                          …/nf4-runs/, then python -m experiments.nf4_accuracy)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=/work/paper-runs
LOG=/work/sitting.log
SNAP=/work/snap                                              # ../shared from here is /work/shared too
[ -z "${GPU:-}" ] || export CUDA_VISIBLE_DEVICES=$GPU        # GPU=i pins this command's jobs to GPU i (go, with several)

snapshot() {
  [ -d "$SNAP" ] || { mkdir -p "$SNAP"; tar -c --exclude=./.cache . | tar -x -C "$SNAP"; }
}

case "${1:-}" in
  setup1)                                                    # each call carries ≤ 64 MiB with the tree: the GGUF
    cp .cache/x1/gguf.part.aa /work/gguf.part.aa             # goes in two halves, ../shared's rest with the second
    nvidia-cuda-mps-control -d || true                       # several runs share the GPU instead of taking turns
    ls /work ;;
  setup2)
    tar -xJf .cache/x2/shared.tar.xz -C /work
    cat /work/gguf.part.aa .cache/x2/gguf.part.ab > /work/smollm2.gguf
    python ../shared/tools/gguf_to_meta.py /work/smollm2.gguf /work/smollm2
    mkdir -p /work/shared/models/smollm2-135m-instruct
    mv /work/smollm2.gguf /work/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  go)                                                       # call 2 in one: ../shared, the suite on this tree (COMMIT=),
    : "${COMMIT:?set COMMIT to the commit hash of the tree under test}"      # the paper queue and the packed run
    bash "$0" setup2
    n=$(nvidia-smi -L | wc -l)
    if (( n == 1 )); then                                    # one GPU: the suite beside a few runs (MPS)
      SUITE_ARGS="${SUITE_ARGS:--n 8 --dist loadfile --durations=40}" bash "$0" suite
      bash "$0" start --only ${ONLY:-lora-s1 echo-lora-s1 lora-s2 echo-lora-s2} --jobs "${JOBS:-4}"
      bash "$0" startpack
      [ -z "${NF4:-}" ] || bash "$0" startnf4                # NF4=1: issue 32's two NF4 runs as well
    else                                                     # several: the suite alone on GPU 0 (the one-GPU setting
      GPU=0 SUITE_ARGS="${SUITE_ARGS:--n 8 --dist loadfile --durations=40}" bash "$0" suite      # it must pass in);
      runs=$(seq -s ' ' 1 $((n - 1)))                        # from 4 GPUs the two benchmarks each alone on the last
      if (( n >= 4 )); then                                  # two; the queue (seeds first) PER_GPU runs per GPU
        GPU=$((n - 1)) bash "$0" nf4bench; GPU=$((n - 2)) bash "$0" packbench; runs=$(seq -s ' ' 1 $((n - 3)))
      fi
      bash "$0" start --only ${ONLY:-seed1 seed2 probe ablation sweep} \
        --jobs $(( $(wc -w <<< "$runs") * ${PER_GPU:-3} )) --gpus $runs
      GPU=${runs%% *} bash "$0" startpack
      GPU=${runs##* } bash "$0" startnf4
    fi ;;
  start)
    shift
    snapshot
    mkdir -p "$RUNS"
    cp -rn results/smollm2-135m-paper-recipe/runs/. "$RUNS"/          # finished runs: skipped by the queue
    cd "$SNAP"
    PYTHONUNBUFFERED=1 setsid nohup python -m experiments.reproduce --model /work/smollm2 --runs-dir "$RUNS" "$@" \
      >"$LOG" 2>&1 </dev/null &
    sleep 5; tail -3 "$LOG" ;;
  startpack)                                                 # issue 30: lora-s0's train command with --pack, greedy eval
    bash "$0" _variant pack lora-s0-pack --pack ;;
  startnf4)                                                  # issue 32: lora-s0 and echo-lora-s0 on an NF4 base
    bash "$0" _variant nf4 lora-s0-nf4 --base-format nf4
    bash "$0" _variant nf4 echo-lora-s0-nf4 --echo --base-format nf4 ;;
  _variant)                                                  # _variant SUFFIX NAME FLAGS...: lora-s0's paper-recipe train
    snapshot                                                 # command + FLAGS into $RUNS-SUFFIX/NAME, then its greedy eval
    dir="$RUNS-$2"; r="$dir/$3"; shift 3                     # (train.py + eval.py, not reproduce: no beam-4, no base eval)
    mkdir -p "$dir"
    cd "$SNAP"
    d=commonsense
    PYTHONUNBUFFERED=1 setsid nohup bash -c "python train.py --model /work/smollm2 --data $(for t in boolq social_i_qa ARC-Easy ARC-Challenge openbookqa; do printf '../shared/data/%s/%s/train.json ' $d $t; done) \
      --method lora --seed 0 --lr 0.0002 --epochs 3 --rank 16 --alpha 32 --dropout 0.05 --global-batch 16 --max-len 256 \
      --val-split 0.02 --eval-every 800 $* --out $r >$r.train.log 2>&1 && python eval.py --model /work/smollm2 --adapter $r \
      --data-dir ../shared/data/$d --tasks boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa --greedy --out $r/eval-greedy.json >$r.eval.log 2>&1" >"$LOG.$(basename "$r")" 2>&1 </dev/null &
    sleep 5; tail -c 300 "$r.train.log" ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while (( SECONDS < end )) && pgrep -f "[e]xperiments.reproduce|[t]rain.py --model /work/smollm2|[e]val.py --model /work/smollm2" >/dev/null; do sleep 20; done
    bash "$0" status ;;
  status)
    tail -n 2 /work/gpu-suite.txt 2>/dev/null || true
    [ -f /work/nf4-bench.jsonl ] && echo "nf4 bench: $(wc -l < /work/nf4-bench.jsonl) configurations" || true
    for f in "$RUNS"/*.train.log "$RUNS-pack"/*.train.log "$RUNS-nf4"/*.train.log; do
      [ -f "$f" ] && echo "$(basename "$f" .train.log): $(tail -c 300 "$f" | tr '\r' '\n' | tail -n 1 | cut -c1-80)"
    done
    grep -E "^\[" "$LOG" 2>/dev/null | cut -c1-50 | tail -n 4 || true
    echo "finished: $(find "$RUNS" -name summary.json 2>/dev/null | wc -l) runs"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader ;;
  suitewait)                                                 # until the suite ends (≤ $2 s), then its log to $OUT
    end=$((SECONDS + ${2:-540}))
    while (( SECONDS < end )) && ! grep -q "^# exit status" /work/gpu-suite.txt 2>/dev/null; do sleep 10; done
    tail -n 3 /work/gpu-suite.txt
    for f in /work/gpu-suite.txt /work/bench-before.jsonl /work/bench-after.jsonl; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    true ;;
  hold)                                                      # the scheduler goes; its running children finish
    pkill -f "[e]xperiments.reproduce" || true
    echo "running: $(pgrep -fc '[t]rain.py|[e]val.py' || true)" ;;
  teacher)                                                   # once echo-lora-s0 has finished
    cd "$SNAP"
    PYTHONUNBUFFERED=1 python -m experiments.teacher_probe "$RUNS/echo-lora-s0" --model /work/smollm2 \
      --out "$RUNS/echo-lora-s0/teacher-probe.json" ;;
  suite)                                                     # the GPU suite, beside the runs: COMMIT=<hash> names the tree
    : "${COMMIT:?set COMMIT to the commit hash of the tree under test}"
    snapshot
    COMMIT=$COMMIT SUITE_ARGS="${SUITE_ARGS:---durations=40}" setsid nohup bash "$0" _suite >/dev/null 2>&1 </dev/null &
    sleep 3; head -n 2 /work/gpu-suite.txt ;;
  _suite)
    cd "$SNAP"
    { echo "# python -m pytest -q -rA tests on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)," \
           "tree $COMMIT, ../shared complete, extra pytest args: ${SUITE_ARGS:-none}, started $(date -u +%FT%TZ)"
      PYTHONUNBUFFERED=1 python -m pytest -q -rA tests ${SUITE_ARGS:-} 2>&1 && echo "# exit status 0" || echo "# exit status $?"
    } >/work/gpu-suite.txt 2>&1 ;;
  nf4bench)                                                  # issue 24's measurements, in the background
    snapshot
    setsid nohup bash "$0" _nf4bench >/work/nf4-bench.log 2>&1 </dev/null &
    sleep 3; tail -n 2 /work/nf4-bench.log ;;
  _nf4bench)                                                 # one configuration at a time
    cd "$SNAP"
    B="python tests/benchmark.py --json /work/nf4-bench.jsonl"
    python tests/bench_nf4_dequant.py --json /work/nf4-dequant.jsonl || true      # the dequant alone, per 8B shape
    $B --model llama3-8b --batch 2 --seq 256 --echo off routed --base-format plain nf4 || true
    ECHO_LORA_NF4_EAGER=1 $B --model llama3-8b --batch 2 --seq 256 --echo off routed --base-format nf4 || true
    $B --model llama3-70b --batch 1 --seq 256 --echo off routed --base-format nf4 --warmup 3 --steps 5 || true
    $B --model llama3-8b --batch 8 --seq 1024 --echo routed --base-format plain nf4 --graphs off --steps 5 || true
    $B --model llama3-8b --batch 8 --seq 1024 --echo routed --base-format plain nf4 --graphs off --steps 5 \
       --activation-checkpointing || true
    $B --model llama3-8b --batch 2 --seq 256 --echo off --base-format nf4 --steps 5 --profile || true ;;
  packbench)                                                 # issue 30's speed records, GPU alone, in the background
    snapshot
    setsid nohup bash "$0" _packbench >/work/pack-bench.log 2>&1 </dev/null &
    sleep 3; tail -n 2 /work/pack-bench.log ;;
  _packbench)                                                # records land in the snapshot's results/, copied to $OUT by collect
    cd "$SNAP"
    timeout 600 python -m experiments.pack_attention --model /work/smollm2 || true
    python -m experiments.pack_speed --model /work/smollm2 --tag smollm2-lora || true
    python -m experiments.pack_speed --model /work/smollm2 --echo --tag smollm2-echo-lora || true
    python -m experiments.pack_speed --model /work/smollm2 --pack-attention flex --pack-layout flat \
      --tag smollm2-lora-flex-flat || true                   # the block-sparse kernel on one flat row per micro-batch
    python -m experiments.pack_speed --shape llama3-8b --tokenizer ../shared/tokenizers/llama3 --steps 100 \
      --tag llama3-8b-shape-lora || true
    tar -cf /work/pack-bench.tar results/speed/pack-vs-padded-* results/speed/pack-attention-*.jsonl 2>/dev/null || true ;;
  bench)                                                     # the routed step, the tree before the Echo refactor
    snapshot                                                 # (.cache/before, carried) against this one, GPU alone
    shift; [ $# -gt 0 ] || set -- "/work/smollm2 --batch 16" "llama3-8b --batch 2"     # bench ["MODEL --batch B" ...]
    for m in "$@"; do
      (cd .cache/before && timeout 300 python tests/benchmark.py --model $m --seq 256 --echo routed --steps 30 \
         --json /work/bench-before.jsonl | grep -o '"ms": [0-9.]*' | tr '\n' ' ') || true
      (cd "$SNAP" && timeout 300 python tests/benchmark.py --model $m --seq 256 --echo routed --steps 30 \
         --json /work/bench-after.jsonl | grep -o '"ms": [0-9.]*' | tr '\n' ' ') || true
      echo " <- $m: before, after"
    done ;;
  collect)                                                   # metrics.jsonl is summarised, not brought back
    (cd "$SNAP" && python -c "import sys, pathlib; from experiments.analysis import metrics_summary
for d in sys.argv[1:]: [metrics_summary(r) for r in pathlib.Path(d).glob('*/') if (r / 'summary.json').is_file()]" \
        "$RUNS" "$RUNS-sweep" "$RUNS-pack" "$RUNS-nf4") || true                                  # metrics-summary.json in each finished run
    tar -cJf /tmp/paper-runs.tar.xz -C /work --exclude='*/checkpoint' --exclude='*/adapter' \
        --exclude='*-predictions' --exclude='*/base/data' --exclude='*/metrics.jsonl' --exclude='*/echo.safetensors' \
        "$(basename "$RUNS")" $( [ -d "$RUNS-sweep" ] && basename "$RUNS-sweep" ) $( [ -d "$RUNS-pack" ] && basename "$RUNS-pack" ) \
        $( [ -d "$RUNS-nf4" ] && basename "$RUNS-nf4" )
    split -b 15M /tmp/paper-runs.tar.xz "$OUT/paper-runs.part."
    cp "$LOG" "$OUT/sitting.log"
    for f in /work/gpu-suite.txt /work/nf4-bench.jsonl /work/nf4-bench.log /work/bench-before.jsonl /work/bench-after.jsonl \
             /work/pack-bench.log /work/pack-bench.tar /work/nf4-dequant.jsonl; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    ls -la "$OUT" ;;
  ingest)                                                    # HERE, not on the device: ingest FILES_AT (collect's files)
    F=$2; S=$(mktemp -d)                                     # finished runs into results/, machine paths rewritten
    cat "$F"/paper-runs.part.* | tar -xJ -C "$S"
    sani() { sed -i -e 's#/work/snap#<repo>#g' -e 's#/work/shared#../shared#g' -e 's#/work/smollm2#<smollm2>#g' \
      -e 's#/work/paper-runs-sweep/#results/smollm2-135m-paper-recipe/sweep/#g' -e 's#/work/paper-runs-\([a-z0-9]*\)/#results/smollm2-135m-paper-recipe/\1-runs/#g' \
      -e 's#/work/paper-runs/#results/smollm2-135m-paper-recipe/runs/#g' -e 's#/[^ "]*/bin/python[0-9.]*#python#g' \
      -e 's#/tmp/pytest-of-[a-z]*/pytest-[0-9]*#<tmp>#g' -e 's#/[^ "]*/site-packages#<site-packages>#g' "$@"; }
    for r in "$S"/paper-runs*/*/; do
      n=$(basename "$r"); kind=$(basename "$(dirname "$r")"); kind=${kind#paper-runs}
      dest=results/smollm2-135m-paper-recipe/${kind:+${kind#-}-}runs/$n
      [ "$kind" = -sweep ] && dest=results/smollm2-135m-paper-recipe/sweep/$n
      [ -f "$r/eval-greedy.json" ] || [ "$kind" = -sweep ] && [ -f "$r/summary.json" ] || { echo "unfinished: $kind $n"; continue; }
      [ -e "$dest" ] && { echo "already recorded: $dest"; continue; }
      mkdir -p "$(dirname "$dest")"; cp -r "$r" "$dest"
      [ -f "$(dirname "$r")/$n.train.log" ] && [ ! -f "$dest/train.log" ] && cp "$(dirname "$r")/$n.train.log" "$dest/train.log"
      sani $(find "$dest" -type f); echo "added $dest"
    done
    [ -f "$F/gpu-suite.txt" ] && { cp "$F/gpu-suite.txt" "$S/gpu-suite.txt"; sani "$S/gpu-suite.txt"
      echo "suite log (sanitised): $S/gpu-suite.txt"; tail -n 3 "$S/gpu-suite.txt"; }
    grep -rlE "/work/|/opt/|/tmp/|/home/" results/ | head || true ;;
  *)
    sed -n '2,30p' "$0"; exit 2 ;;
esac
