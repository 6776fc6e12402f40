#!/usr/bin/env bash
# #8 on the GPU: the multi-round lmsys workload with the prefix cache off, on (GPU only) and on with the host
# tier, each through its own engine (Llama-3-8B shape, dummy weights). The GPU KV cache is cut to BLOCKS
# blocks so that conversations outgrow it between turns, the case the host tier is for.
#   bash benchmarks/issue8_offload.sh OUTDIR [BLOCKS]
out=$1
blocks=${2:-6144}
for cfg in "nocache:--no-enable-prefix-caching" "cache:--enable-prefix-caching" "offload:--kv-offload-gb 64"; do
  tag=${cfg%%:*}
  python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --admission predicted \
    --workload multiround:lmsys:400:4 --num-kv-blocks "$blocks" ${cfg#*:} \
    --output "$out/issue8-$tag.json" 2>&1 | grep -v "it/s\]$" | tail -12
done
