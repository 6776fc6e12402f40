#!/usr/bin/env bash
# #9 on 2 GPUs: Llama-3-70B's shape cut to LAYERS decoder layers (dummy weights), TP = 2. `tune` searches the spec
# (collectives on a network unit; all-reduce or all-gather form per nano-batch; or only the collectives overlapped)
# and measures the best candidates on every rank; `bench` then runs each mode in its own engine: non-overlap, and
# pipeline with the fastest overlapped candidate tune measured (the chosen spec itself when it is not non-overlap).
# From the repository root on the device:
#   [MODEL=llama-3-70b TP=2 WORKLOADS="const:1024:512:300 trace:splitwise:300" MODES="non-overlap pipeline"] \
#     bash benchmarks/issue9_tp.sh OUTDIR tune|bench [LAYERS]
# (MODES=non-overlap needs no tune: two GPU pairs of one host can run the two modes side by side. TIMELINE=1 also
# times every nano-op of one steady iteration on every rank and draws it: timeline-MODE.png.)
# (#11's stand-in on 4 GPUs: MODEL=llama-2-70b TP=4 ... 80.) tune's files go to /tmp/nanoflow-tune (kept on a warm
# machine between calls, where the repository's ignored files are not) and are copied to OUTDIR.
out=$1
what=$2
layers=${3:-40}
name=${MODEL:-llama-3-70b}
tp=${TP:-2}
model="--model $name --num-layers $layers --load-format dummy -tp $tp"
dir=/tmp/nanoflow-tune/$name-$layers-tp$tp
if [ "$what" = tune ]; then
  python3 -m nanoflow.entrypoints.cli tune $model --max-nano-batches 3 --save-candidates "$dir" 2>&1 \
    | grep --line-buffered -v "it/s\]$" | tee "$out/tune-$name-$layers-tp$tp.log" | tail -30
  cp "$dir/ranking.json" "$out/tune-ranking-$name-$layers-tp$tp.json"
  exit
fi
modes=${MODES:-non-overlap pipeline}
spec=
if [[ $modes == *pipeline* ]]; then
  overlapped=$(python3 -c "import json, sys; print(next(r['name'] for r in json.load(open(sys.argv[1])) \
    if r['name'] != 'non-overlap'))" "$dir/ranking.json") || exit 1
  cp "$dir/$overlapped.json" "$out/overlapped-spec-$name-$layers-tp$tp.json"
  spec="--pipeline-spec $dir/$overlapped.json"
fi
workloads=$(for w in ${WORKLOADS:-const:1024:512:300 trace:splitwise:300}; do printf -- "--workload %s " "$w"; done)
for mode in $modes; do
  timeline=${TIMELINE:+--timeline $out/timeline-$name-$layers-tp$tp-$mode.png}
  python3 -m nanoflow.entrypoints.cli bench throughput $model --admission predicted --mode "$mode" $spec \
    $timeline $workloads --output "$out/issue9-$name-$layers-tp$tp-$mode.json" 2>&1 \
    | grep --line-buffered -v "it/s\]$" | tee -a "$out/bench-$name-$layers-tp$tp-$mode.log" | tail -20
done
