#!/usr/bin/env bash
# One GPU sitting of the reproduction on a lent machine that is given back soon after each call ends: the
# runs go on in the background only while calls keep coming, so `wait` is a call of its own (≤ 10 min) and
# `collect` packs the run records into one file to bring back before the machine goes.
#
#   here:   tar -cJf .cache/x1/shared.tar.xz -C .. --exclude=shared/models/smollm2-135m-instruct shared
#           split -b 49M ../shared/models/smollm2-135m-instruct/*.gguf .cache/gguf.part.   (aa -> .cache/x1, ab -> .cache/x2)
#   call 1: bash experiments/sitting.sh setup1            (carry .cache/x1)
#   call 2: bash experiments/sitting.sh setup2 && bash experiments/sitting.sh start --only seed0 ablation probe --jobs 6
#                                                          (carry .cache/x2)
#           COMMIT=<hash> bash experiments/sitting.sh suite    (the GPU suite in the background, into /work/gpu-suite.txt)
#           bash experiments/sitting.sh nf4bench          (issue 24's NF4 / checkpointing benchmark, in the background)
#   calls:  bash experiments/sitting.sh wait 580          (back to back: a gap over ~30 s loses the machine)
#           bash experiments/sitting.sh teacher           (the teacher probe, once echo-lora-s0 is done)
#   last:   bash experiments/sitting.sh collect           (then, here: untar into results/smollm2-135m-paper-recipe/runs/
#                                                          and python -m experiments.reproduce --only-table)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=/work/paper-runs
LOG=/work/sitting.log

case "${1:-}" in
  setup1)
    tar -xJf .cache/x1/shared.tar.xz -C /work
    cp .cache/x1/gguf.part.aa /work/gguf.part.aa
    nvidia-cuda-mps-control -d || true                       # several runs share the GPU instead of taking turns
    ls /work/shared ;;
  setup2)
    cat /work/gguf.part.aa .cache/x2/gguf.part.ab > /work/smollm2.gguf
    python ../shared/tools/gguf_to_meta.py /work/smollm2.gguf /work/smollm2
    mkdir -p /work/shared/models/smollm2-135m-instruct
    mv /work/smollm2.gguf /work/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  start)
    shift
    PYTHONUNBUFFERED=1 setsid nohup python -m experiments.reproduce --model /work/smollm2 --runs-dir "$RUNS" "$@" \
      >"$LOG" 2>&1 </dev/null &
    sleep 5; tail -3 "$LOG" ;;
  wait)
    end=$((SECONDS + ${2:-580}))
    while (( SECONDS < end )) && pgrep -f experiments.reproduce >/dev/null; do sleep 20; done
    grep -E "^\[|done|error" "$LOG" | tail -15
    ls "$RUNS" | grep -c summary || true
    find "$RUNS" -name summary.json | sed "s|$RUNS/||" ;;
  teacher)                                                   # once echo-lora-s0 has finished
    PYTHONUNBUFFERED=1 python -m experiments.teacher_probe "$RUNS/echo-lora-s0" --model /work/smollm2 \
      --out "$RUNS/echo-lora-s0/teacher-probe.json" ;;
  suite)                                                     # the GPU suite, beside the runs: COMMIT=<hash> names the tree
    : "${COMMIT:?set COMMIT to the commit hash of the tree under test}"
    COMMIT=$COMMIT setsid nohup bash "$0" _suite >/dev/null 2>&1 </dev/null &
    sleep 3; head -2 /work/gpu-suite.txt ;;
  _suite)
    { echo "# python -m pytest -q -rA tests on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)," \
           "tree $COMMIT, ../shared complete, started $(date -u +%FT%TZ)"
      PYTHONUNBUFFERED=1 python -m pytest -q -rA tests 2>&1 && echo "# exit status 0" || echo "# exit status $?"
    } >/work/gpu-suite.txt 2>&1 ;;
  nf4bench)                                                  # issue 24's measurements, in the background
    setsid nohup bash "$0" _nf4bench >/work/nf4-bench.log 2>&1 </dev/null &
    sleep 3; tail -2 /work/nf4-bench.log ;;
  _nf4bench)                                                 # one configuration at a time
    B="python tests/benchmark.py --json /work/nf4-bench.jsonl"
    $B --model llama3-8b --batch 2 --seq 256 --echo off routed --base-format plain nf4 || true
    $B --model llama3-70b --batch 1 --seq 256 --echo off routed --base-format nf4 --warmup 3 --steps 5 || true
    $B --model llama3-8b --batch 8 --seq 1024 --echo routed --base-format plain nf4 --graphs off --steps 5 || true
    $B --model llama3-8b --batch 8 --seq 1024 --echo routed --base-format plain nf4 --graphs off --steps 5 \
       --activation-checkpointing || true
    $B --model llama3-8b --batch 2 --seq 256 --echo off --base-format nf4 --steps 5 --profile || true ;;
  status)                                                    # everything at a glance, between waits
    tail -3 /work/gpu-suite.txt 2>/dev/null; grep -c . /work/nf4-bench.jsonl 2>/dev/null; tail -2 /work/nf4-bench.log 2>/dev/null
    grep -E "^\[|done|error" "$LOG" | tail -8; find "$RUNS" -name summary.json | sed "s|$RUNS/||"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader ;;
  collect)
    tar -cJf "$OUT/paper-runs.tar.xz" -C "$RUNS" --exclude='*/checkpoint' --exclude='*/adapter' \
        --exclude='*-predictions' --exclude='*/base/data' .
    cp "$LOG" "$OUT/sitting.log"
    for f in /work/gpu-suite.txt /work/nf4-bench.jsonl /work/nf4-bench.log; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    ls -la "$OUT" ;;
  *)
    sed -n '2,15p' "$0"; exit 2 ;;
esac
