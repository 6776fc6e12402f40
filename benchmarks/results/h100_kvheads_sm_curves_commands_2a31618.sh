# The exact commands of session 18's kv_heads timings by sm_curves.py's method (one H100, the 1-GPU kind, at
# 2a31618), run from benchmarks/ after `source benchmarks/gpu_env.sh`. Outputs: h100_sm_curves_contexts_kvheads_*,
# h100_short_kvheads_configs_* and h100_short_32sms_kvheads_configs_*.
cd benchmarks
python -c "
import torch, json
from sm_curves import decode_contexts
from nanoflow.pipeline.units import total_sms
full = total_sms()
res = {}
res['bf16_kv4'] = decode_contexts(dict(pages=True, num_warps=2, num_stages=4, per_sm=8, block_g=16, kv_heads=4), [full], torch.bfloat16)
res['bf16_kv1_page'] = decode_contexts(dict(pages=True, num_warps=1, num_stages=6, per_sm=8, block_g=4), [full], torch.bfloat16)
res['fp8_kv2'] = decode_contexts(dict(pages=True, num_warps=2, num_stages=6, per_sm=4, block_g=8, kv_heads=2), [full], torch.float8_e4m3fn)
json.dump(res, open('$OUT/h100_sm_curves_contexts_kvheads.json', 'w'), indent=1)
"
# the whole card (share(full)); the 32-SM call: share(32) and configs
# (1,1,6,8),(1,1,6,16),(2,1,6,16),(2,1,4,16),(2,2,4,16),(2,2,6,16),(4,2,4,16),(4,2,3,16),(4,2,4,32)
python -c "
import torch, json
from sm_curves import run_decode, run_engine
from decode_sweep import case
from nanoflow.pipeline.units import share, total_sms
full = total_sms(); granted, stream = share(full)
q, kc, vc, meta, nbytes = case(1024, 256)
out = torch.empty_like(q)
rows = []
for rnd in range(2):
  rows.append(('engine', nbytes / run_engine(granted, q, kc, vc, meta, out, stream) / 1e9))
  for n, w, s, k in [(4,2,4,8),(4,2,3,8),(4,2,4,4),(4,2,4,16),(4,4,4,8),(4,2,6,8),(8,4,2,4),(8,4,3,4),(8,2,2,8),(8,4,2,8),(2,2,6,8)]:
    c = dict(pages=True, num_warps=w, num_stages=s, per_sm=k, block_g=4*n, kv_heads=n)
    try: rows.append((str(c), nbytes / run_decode(c, granted, q, kc, vc, meta, out, stream) / 1e9))
    except Exception as e: rows.append((str(c), type(e).__name__))
for r in rows: print(r)
json.dump(rows, open('$OUT/h100_short_kvheads_configs.json','w'), indent=1)
"
