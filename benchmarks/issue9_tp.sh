#!/usr/bin/env bash
# #9 on 2 GPUs: Llama-3-70B's shape cut to LAYERS decoder layers (dummy weights), TP = 2. `tune` searches the spec
# (collectives on a network unit; all-reduce or all-gather form per nano-batch), then each MODE runs the workloads
# in its own engine. From the repository root on the device:
#   bash benchmarks/issue9_tp.sh OUTDIR tune|bench [LAYERS]
out=$1
what=$2
layers=${3:-40}
model="--model llama-3-70b --num-layers $layers --load-format dummy -tp 2"
if [ "$what" = tune ]; then
  mkdir -p .tuned  # (kept on a warm machine between calls; git ignores it)
  python3 -m nanoflow.entrypoints.cli tune $model --max-nano-batches 3 --output .tuned/issue9-tuned.json 2>&1 \
    | grep -v "it/s\]$" | tail -30
  cp .tuned/issue9-tuned.json "$out/"
  exit
fi
spec=.tuned/issue9-tuned.json
[ -f "$spec" ] || spec=auto
for mode in non-overlap pipeline; do
  python3 -m nanoflow.entrypoints.cli bench throughput $model --admission predicted --mode "$mode" \
    --pipeline-spec "$spec" \
    --workload const:1024:512:300 --workload trace:splitwise:300 --output "$out/issue9-$mode.json" 2>&1 \
    | grep -v "it/s\]$" | tail -14
done
