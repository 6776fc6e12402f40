#!/usr/bin/env bash
# #10 on the GPU: Mixtral-8x7B (dummy weights, bf16: ~93 GB, one H200) through non-overlap and pipeline (spec auto:
# what `nanoflow tune --model mixtral-8x7b` saved, else non-overlap's ops on the whole device), one engine per mode,
# on the same workloads. MODES picks the modes (one per device command if time is short); extra arguments go to
# every run (e.g. -tp 2 on two H100s). The splitwise figures of BENCHMARKS.md (#10, sessions 16 and 17) ran alone,
# with --max-num-batched-tokens 4096 --schedule-policy slack (lof before); const 1024/512, held by the KV cache,
# runs best at 2,048 (`nanoflow bench schedule` compares budgets and policies without a GPU).
#   [MODES="non-overlap pipeline"] bash benchmarks/issue10_suite.sh OUTDIR [ENGINE ARGS...]
out=$1
shift
mkdir -p "$out"
for mode in ${MODES:-non-overlap pipeline}; do
  python3 -m nanoflow.entrypoints.cli bench throughput --model mixtral-8x7b --load-format dummy --admission predicted \
    --workload const:1024:512:400 --workload trace:splitwise:400 --mode "$mode" --pipeline-spec auto "$@" \
    --output "$out/issue10-$mode.json" 2>&1 | grep -v "it/s\]$" | tail -40
done
