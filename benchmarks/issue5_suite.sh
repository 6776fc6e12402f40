#!/usr/bin/env bash
# The #5 ablation: pipeline vs nanobatch-only vs non-overlap, each mode through its own engine on the same
# workloads (same seed), Llama-3-8B shape with dummy weights. Run on the device from the repository root:
# bash benchmarks/issue5_suite.sh OUTDIR [SPEC]
spec=${2:-llama-3-8b-h100-hand}
for mode in pipeline non-overlap nanobatch-only; do
  extra=""
  [ "$mode" = pipeline ] && extra="--timeline $1/issue5_timeline.png"
  python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --admission predicted \
    --workload const:1024:512:400 --workload trace:splitwise:400 --mode "$mode" --pipeline-spec "$spec" $extra \
    --output "$1/issue5_$mode.json" 2>&1 | grep -v "it/s\]$" | tail -40
done
