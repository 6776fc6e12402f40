# ad-hoc: the engine's page kernel over fp8 with the e4m3 widening by integer ops (FAST8=1), against itself without
set -x
A="--seqs 524 --ctx 1024 --ctx-max 1536 --hq 32 --hkv 8 --width 2048"
rm -rf /tmp/exp && mkdir -p /tmp/exp && cp -r nanoflow /tmp/exp/ && cp exp/triton_attention_fp8asm.py /tmp/exp/nanoflow/kernels/triton_attention.py
for round in 1 2; do
  python benchmarks/decode_sweep.py $A --kv-cache-dtype fp8 --default-only 2>&1 | tail -1
  FAST8=1 PYTHONPATH=/tmp/site:/tmp/exp python benchmarks/decode_sweep.py $A --kv-cache-dtype fp8 --default-only 2>&1 | tail -1
  FAST8=0 PYTHONPATH=/tmp/site:/tmp/exp python benchmarks/decode_sweep.py $A --kv-cache-dtype fp8 --default-only 2>&1 | tail -1
done
python benchmarks/decode_sweep.py $A --head-dim 64 --kernel page 2>&1 | tail -9
python benchmarks/decode_sweep.py $A --kernel page 2>&1 | tail -9
FAST8=1 PYTHONPATH=/tmp/site:/tmp/exp python benchmarks/decode_sweep.py $A --kv-cache-dtype fp8 --kernel page 2>&1 | tail -9
