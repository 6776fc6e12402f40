#!/usr/bin/env bash
# The non-overlapped GPU engine (#3) on the workloads of BENCHMARKS.md, one engine for all of them.
# Run on the device from the repository root: bash benchmarks/issue3_suite.sh OUTDIR
python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --admission predicted \
  --workload const:1024:512:500 --workload const:512:512:600 --workload const:512:1024:400 \
  --workload trace:splitwise:600 --workload trace:lmsys:1500 --workload trace:sharegpt:800 \
  --breakdown --output "$1/issue3_suite.json"
