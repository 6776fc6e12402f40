#!/usr/bin/env bash
# nanoflow vs HF transformers continuous batching (generate_batch), same weights, same process.
python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --admission predicted \
  --workload const:512:256:256 --baseline hf --output "$1/issue3_hf.json"
