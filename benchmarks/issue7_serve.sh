#!/usr/bin/env bash
# #7 on the GPU: latency vs request rate on the splitwise trace, one server per mode (Llama-3-8B shape,
# dummy weights). From the repository root on the device: bash benchmarks/issue7_serve.sh OUTDIR MODE... 
out=$1
shift
for mode in "$@"; do
  python3 -m nanoflow.entrypoints.cli serve --model llama-3-8b --load-format dummy --admission predicted \
    --mode "$mode" --port 8000 > "$out/serve-$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null && break; sleep 1
  done
  python3 -m nanoflow.entrypoints.cli bench serve --url http://127.0.0.1:8000 --workload trace:splitwise \
    --num-requests 300 --sweep 8,16,23 --vocab-size 128256 --output "$out/issue7-$mode.json" \
    --plot "$out/issue7-$mode.png" 2>&1 | grep -v "it/s\]$" | tail -30
  kill -TERM $server; wait $server
done
