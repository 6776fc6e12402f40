#!/usr/bin/env bash
# The #5 ablation: each MODE[:SPEC] through its own engine on the same workloads (same seed), Llama-3-8B
# shape with dummy weights. Run on the device from the repository root:
#   bash benchmarks/issue5_suite.sh OUTDIR pipeline:llama-3-8b-h100-hand non-overlap nanobatch-only:...
out=$1
shift
for run in "$@"; do
  mode=${run%%:*}
  spec=${run#*:}
  [ "$spec" = "$run" ] && spec=auto
  tag="$mode-$(basename "$spec" .json)"
  extra=""
  [ "$mode" = pipeline ] && extra="--timeline $out/timeline-$tag.png"
  python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --admission predicted \
    --workload const:1024:512:400 --workload trace:splitwise:400 --mode "$mode" --pipeline-spec "$spec" $extra \
    --output "$out/issue5-$tag.json" 2>&1 | grep -v "it/s\]$" | tail -40
done
