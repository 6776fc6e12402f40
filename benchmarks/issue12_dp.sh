#!/usr/bin/env bash
# #12 on a machine with 2 GPUs: data-parallel scaling of the Llama-3-8B shape (dummy weights), N replicas behind
# the Ray router (`nanoflow serve --data-parallel-size N`, Ray started locally), splitwise trace:
#   offline: OFFLINE requests per replica (600) sent at once (bench serve --request-rate inf): the maximum throughput;
#   online: Poisson arrivals at the same rates per replica (RATES, req/s per replica), ONLINE requests per replica
#           (300) and rate: throughput and p99 latency at equal per-replica load.
# The front end's CPU time so far is logged after each run (one Python process serves every replica's stream:
# the capacity model's front-end term). Then a table of
# N = 2 against N = 1 from the JSON reports. From the repository root on the device, after
# `source benchmarks/gpu_env.sh` and Ray installed (BENCHMARKS.md #12 says how its wheel travels):
#   [RATES=10,20 OFFLINE=600 ONLINE=300 STREAM_INTERVAL=1 API_SERVERS=1] bash benchmarks/issue12_dp.sh OUTDIR [N ...]
# (default N: 1 2; with the default sizes one N per call fits 10 minutes)
out=$1
shift
rates=${RATES:-10,20}  # integers
for n in ${*:-1 2}; do
  python3 -m nanoflow.entrypoints.cli serve --model llama-3-8b --load-format dummy --admission predicted \
    --data-parallel-size "$n" --max-waiting-requests 100000 --stream-interval "${STREAM_INTERVAL:-1}" \
    --api-server-count "${API_SERVERS:-1}" --port 8000 $([ "$n" = 1 ] && echo --ray-address local) \
    > "$out/issue12-serve-dp$n.log" 2>&1 &  # (N = 1 on Ray too, the baseline: without an address it runs in-process)
  server=$!
  for _ in $(seq 600); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null && break; sleep 1
  done
  bench() {
    python3 -m nanoflow.entrypoints.cli bench serve --url http://127.0.0.1:8000 --workload trace:splitwise \
      --vocab-size 128256 "$@" 2>&1 | grep --line-buffered -v "it/s\]$" | tee -a "$out/issue12-bench.log" | tail -16
    # the serving process, and with API_SERVERS > 1 each API-server process it spawned
    for p in $server $(pgrep -P $server -f spawn_main); do
      echo "front end (router + HTTP) CPU time so far, pid $p: $(ps -o cputime= -p $p)"
    done
  }
  bench --num-requests $((${OFFLINE:-600} * n)) --request-rate inf --output "$out/issue12-dp$n-offline.json"
  sweep=$(IFS=,; for r in $rates; do printf "%d," $((n * r)); done)
  bench --num-requests $((${ONLINE:-300} * n)) --sweep "${sweep%,}" --output "$out/issue12-dp$n-online.json"
  kill -TERM $server; wait $server
done
python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(n, kind):
    path = f"{out}/issue12-dp{n}-{kind}.json"
    return json.load(open(path))["results"] if os.path.exists(path) else None
cols = [("request_rate", "offered req/s", "{}"), ("request_throughput", "req/s", "{:.2f}"),
        ("output_throughput", "output tok/s", "{:.0f}"), ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"),
        ("p99_tpot_ms", "p99 TPOT ms", "{:.1f}"), ("p99_e2e_ms", "p99 E2E ms", "{:.0f}"), ("failed", "failed", "{}")]
print("| run | replicas | " + " | ".join(c[1] for c in cols) + " |")
print("| --- | ---: |" + " ---: |" * len(cols))
for kind in ("offline", "online"):
    for n in (1, 2):
        for r in load(n, kind) or []:
            cells = ["-" if r[k] is None else f.format(r[k]) for k, _, f in cols]
            print(f"| {kind} | {n} | " + " | ".join(cells) + " |")
one, two = load(1, "offline"), load(2, "offline")
if one and two:
    print(f"offline scaling, 2 replicas / 1: {two[0]['request_throughput'] / one[0]['request_throughput']:.2f}x")
EOF
