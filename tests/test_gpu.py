"""GPU path against the CPU reference (skipped without CUDA).

Tolerances: elementwise fusions in bf16 vs the fp32 reference of the same bf16 inputs, relative error
< 1e-2; whole-model logprobs in bf16 vs fp32 within 0.1 + 2% nats (far-tail tokens of a random model
have logprobs near -20, where bf16 rounding of the logits moves them by tenths)."""
import json
import os

import pytest
import torch

from conftest import gpu, make_gpu_model
from nanoflow import LLM, SamplingParams
from nanoflow.kernels import reference as ref

pytestmark = gpu

PROMPTS = [[5, 17, 923, 4410, 88, 2011, 7, 301, 12, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
           [1000, 2000, 3000], [77] * 37, list(range(100, 131)), [31337, 2, 3]]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpu_model(tmp_path_factory, "llama")


def test_fused_elementwise_ops_match_reference():
    from nanoflow.kernels import gpu as k
    torch.manual_seed(0)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    k.rms_norm(x, w, 1e-5, out=out)
    assert rel(out, ref.rms_norm(x.float(), w.float(), 1e-5)) < 1e-2
    r1, r2 = torch.randn_like(x), None
    r2 = r1.clone()
    k.add_rms_norm(x, r1, w, 1e-5, out=out)
    expect = ref.rms_norm(r2.float() + x.float(), w.float(), 1e-5)
    assert rel(out, expect) < 1e-2 and rel(r1, r2.float() + x.float()) < 1e-2
    gu = torch.randn(300, 2 * 384, device="cuda", dtype=torch.bfloat16)
    act = torch.empty(300, 384, device="cuda", dtype=torch.bfloat16)
    k.silu_mul(gu, out=act)
    expect = torch.empty(300, 384, device="cuda")
    ref.silu_mul(gu.float(), out=expect)
    assert rel(act, expect) < 1e-2
    # the same on a nano-batch: views of rows [100, 300) of the buffers, as the pipeline passes them
    x, r1, out = torch.randn(3, 400, 512, device="cuda", dtype=torch.bfloat16).unbind(0)
    r2 = r1.clone()
    k.add_rms_norm(x[100:300], r1[100:300], w, 1e-5, out=out[100:300])
    expect = ref.rms_norm(r2[100:300].float() + x[100:300].float(), w.float(), 1e-5)
    assert rel(out[100:300], expect) < 1e-2 and rel(r1[100:300], r2[100:300].float() + x[100:300].float()) < 1e-2
    assert torch.equal(r1[:100], r2[:100]) and torch.equal(r1[300:], r2[300:])
    gu = torch.randn(400, 2 * 384, device="cuda", dtype=torch.bfloat16)
    act = torch.zeros(400, 384, device="cuda", dtype=torch.bfloat16)
    k.silu_mul(gu[100:300], out=act[100:300])
    expect = torch.empty(200, 384, device="cuda")
    ref.silu_mul(gu[100:300].float(), out=expect)
    assert rel(act[100:300], expect) < 1e-2 and not act[:100].any() and not act[300:].any()
    # Qwen3's q / k norm, in place on a nano-batch's views of the qkv rows (8 query and 2 KV heads of 128), then on
    # another (smaller) buffer's (compiled as one function of both views, the second failed: the buffer's size was
    # fixed at the first call)
    qw, kw = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    for rows, a, b in ((400, 100, 300), (64, 0, 32), (64, 16, 64)):
        qkv = torch.randn(rows, 12 * 128, device="cuda", dtype=torch.bfloat16)
        before = qkv.clone()
        k.qk_norm(qkv[a:b, :1024].view(b - a, 8, 128), qkv[a:b, 1024:1280].view(b - a, 2, 128), qw, kw, 1e-6)
        expect = before[a:b].float()
        ref.qk_norm(expect[:, :1024].view(b - a, 8, 128), expect[:, 1024:1280].view(b - a, 2, 128), qw.float(),
                    kw.float(), 1e-6)
        assert rel(qkv[a:b], expect) < 1e-2
        assert torch.equal(qkv[:a], before[:a]) and torch.equal(qkv[b:], before[b:])
        assert torch.equal(qkv[a:b, 1280:], before[a:b, 1280:])
    # the sampler's race, compiled for any row count: the token it picks scores the row's maximum
    # (bf16 logits, as the ranks race on theirs; rows of temperature 0 take the maximum)
    for rows in (683, 5, 1024):
        scores = (torch.randn(rows, 32000, device="cuda") * 4).bfloat16()
        temp = (torch.rand(rows, device="cuda") + 0.5) * (torch.rand(rows, device="cuda") > 0.2)
        q = torch.empty(scores.shape, device="cuda").exponential_()
        t = temp.double()[:, None]
        race = torch.where(t > 0, scores.double() / t - q.double().log(), scores.double())
        best, got = k.exponential_race(scores, temp, q)
        assert torch.allclose(race.gather(1, got[:, None])[:, 0], race.amax(-1), rtol=0, atol=1e-5)
        assert torch.allclose(best.double(), race.amax(-1), rtol=1e-6, atol=1e-5)
    # the sampler, unfiltered, on the device: greedy rows take their argmax inside the race, sampled rows follow
    # softmax(logits / T)
    from nanoflow.layers.sampler import SamplingMetadata, sample
    rows = 4000
    logits = torch.tensor([0.0, 1.0, 2.0], device="cuda").expand(rows, 3).contiguous()
    logits[::2] = torch.randn(rows // 2, 3, device="cuda")
    temp = torch.tensor([0.0, 2.0], device="cuda").repeat(rows // 2)
    zeros = torch.zeros(rows, device="cuda")
    m = SamplingMetadata(temp, zeros.long(), zeros + 1, zeros, [None] * rows, use_min_p=False, use_top_k_p=False)
    got = sample(logits, m)
    assert torch.equal(got[::2], logits[::2].argmax(-1))
    freq = torch.bincount(got[1::2], minlength=3).float() / (rows // 2)
    assert torch.allclose(freq, (logits[1] / 2).softmax(-1), atol=0.03)


def test_gpu_model_matches_cpu_reference(model_dir):
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    cpu = LLM(model_dir, device="cpu").generate(PROMPTS, p, use_tqdm=False)
    for kw in (dict(), dict(cuda_graph=False, async_scheduling=False)):
        got = LLM(model_dir, device="cuda", num_kv_blocks=256, **kw).generate(PROMPTS, p, use_tqdm=False)
        for a, b in zip(got, cpu):
            for pos in range(1, len(a.prompt_token_ids)):
                t = a.prompt_token_ids[pos]
                lp = b.prompt_logprobs[pos][t].logprob
                assert abs(a.prompt_logprobs[pos][t].logprob - lp) < 0.1 + 0.02 * abs(lp)


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


def assert_same_greedy(got, expect, tie=0.05):
    """Same greedy tokens, except where the reference's two best tokens were within `tie` nats: a random
    model has near-ties, and a bf16 GEMM of another shape (a padded bucket, a nano-batch) may round the
    other way there. After such a flip the sequences go their own ways; before it, the chosen tokens'
    logprobs agree within bf16 tolerance (when `got` has logprobs; `expect` must)."""
    for a, b in zip(got, expect):
        a, b = a.outputs[0], b.outputs[0]
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta == tb and a.logprobs:
                la, lb = a.logprobs[i][ta].logprob, b.logprobs[i][tb].logprob
                assert abs(la - lb) < 0.05 + 0.02 * abs(lb), (i, ta, la, lb)
            elif ta != tb:
                top = sorted(x.logprob for x in b.logprobs[i].values())[-2:]
                assert top[1] - top[0] < tie, (i, ta, tb, b.logprobs[i])
                break


def test_graphs_and_async_equal_eager(model_dir):
    """Same kernels with and without CUDA graphs / asynchronous scheduling: the same greedy tokens."""
    runs = []
    for kw in (dict(cuda_graph=False, async_scheduling=False), dict(), dict(max_num_batched_tokens=32)):
        llm = LLM(model_dir, device="cuda", num_kv_blocks=256, **kw)
        runs.append(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert_same_greedy(runs[1], runs[0])
    assert_same_greedy(runs[2], runs[0])


def test_op_breakdown_accounts_for_the_iteration(model_dir):
    """Per-op graph timings of a batch add up to about the time of the whole iteration's graph."""
    from nanoflow.executor.profiling import op_times
    from nanoflow.models.llama import LAYER_OPS
    llm = LLM(model_dir, device="cuda", num_kv_blocks=256)
    runner = llm.engine.runner
    runner.keep_next_batch = True
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    batch = runner.kept_batch
    times = op_times(runner, batch)
    assert set(times) == {"embed", *LAYER_OPS} and all(t >= 0 for t in times.values())
    size = runner.graphs.load(batch)
    graph = runner.graphs.graphs[size]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    whole = start.elapsed_time(end) / 20
    assert 0.5 * whole < sum(times.values()) < 2.0 * whole


def _sm_ids(stream: torch.cuda.Stream, programs: int = 4096) -> set[int]:
    """The SMs that a kernel launched on the stream ran on (PTX %smid)."""
    import triton
    import triton.language as tl

    @triton.jit
    def smid_kernel(OUT):
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(OUT + tl.program_id(0), sm)
    out = torch.zeros(programs, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream):
        smid_kernel[(programs,)](out)
    torch.cuda.synchronize()
    return set(out.tolist())


def test_units_get_disjoint_sm_groups():
    from nanoflow.pipeline.units import partition
    (a, sa), (b, sb) = partition((96, 32))
    ids_a, ids_b = _sm_ids(sa), _sm_ids(sb)
    assert a >= 96 and b >= 32 and len(ids_a) == a and len(ids_b) == b
    assert not ids_a & ids_b


def _pipeline_spec(rows=64):
    from nanoflow.models.llama import LAYER_OPS
    from nanoflow.pipeline.spec import NanoOp, PipelineSpec, Unit
    cuts = [0, 8, 24, 40, rows]  # four uneven nano-batches: decode and prefill rows fall in several
    ops = [NanoOp(op, cuts[i], cuts[i + 1], "mem" if op.endswith("attn") else "gemm")
           for i in range(4) for op in LAYER_OPS]
    return PipelineSpec("four", rows, [Unit("gemm", "compute", 96), Unit("mem", "memory", 32)], ops).validate()


@pytest.mark.parametrize("graphs", [True, False])
def test_pipeline_equals_plain_forward(model_dir, tmp_path, graphs):
    """The pipelined forward on SM-partitioned streams gives the plain forward's greedy tokens and logprobs,
    through prefill-only, mixed and decode-only iterations."""
    path = str(tmp_path / "spec.json")
    _pipeline_spec().save(path)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    kw = dict(device="cuda", num_kv_blocks=256, max_num_batched_tokens=64, cuda_graph=graphs)
    outs = {}
    for mode in ("non-overlap", "pipeline"):
        llm = LLM(model_dir, mode=mode, pipeline_spec=path, **kw)
        outs[mode] = llm.generate(PROMPTS, p, use_tqdm=False)
    assert_same_greedy(outs["pipeline"], outs["non-overlap"])
    for a, b in zip(outs["pipeline"], outs["non-overlap"]):
        for pos in range(1, len(a.prompt_token_ids)):
            t = a.prompt_token_ids[pos]
            assert abs(a.prompt_logprobs[pos][t].logprob - b.prompt_logprobs[pos][t].logprob) < 0.05


def _kept_batch(model_dir, **kw):
    """A mixed batch (decode and prefill rows) of a real run, and its runner."""
    llm = LLM(model_dir, device="cuda", num_kv_blocks=256, max_num_batched_tokens=64, **kw)
    runner = llm.engine.runner
    for i, prompt in enumerate(PROMPTS):
        llm.engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm.engine.step()
    runner.keep_next_batch = True
    llm.engine.step()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    return runner, runner.kept_batch


def test_pipelined_forward_equals_plain_forward(model_dir):
    """One batch (decode and prefill rows), the same KV cache: the plain forward, the spec's nano-ops in order
    on one stream, and the pipeline on its units give the same hidden states (bf16: the nano-batches' GEMMs
    have other shapes, and the pipeline's are cuBLASLt kernels for an SM target)."""
    from nanoflow.pipeline.executor import Pipeline, run_sequential
    runner, host = _kept_batch(model_dir, cuda_graph=False)
    assert 0 < host.num_decode < len(host.seq_lens)
    model, cache = runner.model, runner.model.kv_cache.clone()
    spec = _pipeline_spec()
    states = {}
    forwards = {"plain": model.forward_layers, "nanobatch": lambda b, w: run_sequential(model, spec, b, w),
                "pipeline": Pipeline(model, spec)}
    for name, forward in forwards.items():
        model.kv_cache.copy_(cache)
        ws = runner.ws.rows(host.num_tokens)
        with torch.inference_mode():
            forward(host.to("cuda"), ws)
        torch.cuda.synchronize()
        states[name] = (ws.residual.float() + ws.hidden.float()).clone()
    errors = {k: rel(v, states["plain"]) for k, v in states.items()}
    assert errors["nanobatch"] < 1e-2 and errors["pipeline"] < 1e-2, errors


def test_pipeline_timeline_respects_dependencies(model_dir):
    from nanoflow.pipeline.executor import Pipeline
    llm = LLM(model_dir, device="cuda", num_kv_blocks=256, max_num_batched_tokens=64)
    runner = llm.engine.runner
    runner.keep_next_batch = True
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    pipe = Pipeline(runner.model, _pipeline_spec())
    batch = runner.kept_batch.to("cuda")
    events = pipe.timeline(batch, runner.ws.rows(batch.num_tokens))
    launches, _ = pipe.plan(batch.num_tokens)
    assert len(events) == len(launches) and {e["unit"] for e in events} == {"gemm", "mem"}
    alone = pipe.timeline(runner.kept_batch.to("cuda"), runner.ws.rows(batch.num_tokens), serial=True)
    assert all(b["start_ms"] >= a["end_ms"] - 1e-3 for a, b in zip(alone, alone[1:]))
    for e, launch in zip(events, launches):
        assert e["end_ms"] >= e["start_ms"] >= 0
        for w in launch.waits:
            assert e["start_ms"] >= events[w]["end_ms"] - 1e-3


def test_time_iteration_runs_candidates(model_dir):
    """`nanoflow tune` measures candidates with it: a positive time for the non-overlap spec and a pipeline."""
    from nanoflow.pipeline.measure import time_iteration
    from nanoflow.pipeline.spec import non_overlap
    kw = dict(num_kv_blocks=256, max_num_batched_tokens=64)
    for spec in (non_overlap(64), _pipeline_spec()):
        assert 0 < time_iteration(kw, model_dir, spec, 16, 40, 64) < 1
    assert 0 < time_iteration(kw, model_dir, non_overlap(64), 60, 400, 64) < 1  # more KV than the cache: reused
    with pytest.raises(ValueError, match="does not fit"):
        time_iteration(kw, model_dir, non_overlap(64), 80, 40, 64)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@two_gpus
@pytest.mark.parametrize("mode", ["non-overlap", "pipeline"])
@pytest.mark.parametrize("all_reduce", ["nccl", "symm-mem"])
def test_tensor_parallel_nccl_equals_one_gpu(model_dir, tmp_path, mode, all_reduce):
    """TP = 2 over NCCL, with CUDA graphs: the plain forward, and the pipeline with its collectives on a network unit
    (the first nano-batch's projection in the all-gather form), give one GPU's greedy tokens; with the all-reduces
    through NCCL or torch's symmetric memory; with logprobs (rank 0 gathers the logits) and without (the ranks race
    over their vocabulary slices)."""
    from nanoflow.models.llama import NETWORK_OPS, O_ALLGATHER, O_ALLREDUCE, TP_LAYER_OPS
    from nanoflow.pipeline.spec import NanoOp, PipelineSpec, Unit
    rows = ((0, 24), (24, 64))
    ops = [NanoOp(n, s, e, "net" if n in NETWORK_OPS else "mem" if n.endswith("attn") else "gemm")
           for i, (s, e) in enumerate(rows) for op in TP_LAYER_OPS
           for n in ((O_ALLGATHER if op == "o_proj" else ()) if i == 0 and op in O_ALLREDUCE else (op,))]
    path = str(tmp_path / "tp.json")
    PipelineSpec("tp", 64, [Unit("gemm", "compute", 96), Unit("mem", "memory", 32), Unit("net", "network")],
                 ops).validate().save(path)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(device="cuda", num_kv_blocks=256, max_num_batched_tokens=64)
    ref = LLM(model_dir, **kw).generate(PROMPTS, p, use_tqdm=False)
    got, raced = generate_in_a_process(tmp_path, dict(model=model_dir, tensor_parallel_size=2, mode=mode,
                                                      pipeline_spec=path, **kw), PROMPTS, [p, plain],
                                       env={"NANOFLOW_ALL_REDUCE": all_reduce})
    assert_same_greedy(got, ref)
    assert_same_greedy(raced, ref)


def generate_in_a_process(tmp_path, llm_kwargs, prompts, params: list, env=None):
    """LLM(**llm_kwargs).generate of the prompts with each of the params, in a Python process of its own: NCCL's
    teardown can hang after CUDA graphs captured its collectives (pytorch#115388), which would leave this process
    unable to start another TP engine."""
    import pickle
    import subprocess
    import sys
    job, out = tmp_path / "job.pkl", tmp_path / "outputs.pkl"
    job.write_bytes(pickle.dumps((llm_kwargs, prompts, params, str(out))))
    script = ("import os, pickle, sys\n"
              "from nanoflow import LLM\n"
              "kw, prompts, params, out = pickle.load(open(sys.argv[1], 'rb'))\n"
              "llm = LLM(**kw)\n"
              "pickle.dump([llm.generate(prompts, p, use_tqdm=False) for p in params], open(out, 'wb'))\n"
              "llm.shutdown()\n"
              "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(job)], check=True, timeout=600, env={**os.environ, **(env or {})})
    return pickle.loads(out.read_bytes())


def test_fp8_kv_cache_on_the_gpu(model_dir):
    """--kv-cache-dtype fp8 with CUDA graphs: the Triton kernels store and read float8 e4m3 (in pages of 32), a token
    takes half bf16's bytes, and the logprobs stay near the bf16 cache's."""
    p = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    kw = dict(device="cuda", max_num_batched_tokens=64, num_kv_blocks=256)
    full = LLM(model_dir, **kw)
    a = full.generate(PROMPTS, p, use_tqdm=False)
    fp8 = LLM(model_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.engine.runner.model.kv_cache.dtype == torch.float8_e4m3fn
    f, g = fp8.engine.runner, full.engine.runner
    assert 2 * f._block_bytes() * g.block_size == g._block_bytes() * f.block_size  # what sizes the cache
    b = fp8.generate(PROMPTS, p, use_tqdm=False)
    drift = [abs(next(iter(x.values())).logprob - next(iter(y.values())).logprob)
             for ra, rb in zip(a, b) for x, y in zip(ra.prompt_logprobs[1:], rb.prompt_logprobs[1:])]
    assert max(drift) < 0.5


def test_kv_cache_size_on_the_gpu(model_dir):
    """kv_cache_gb sizes the cache on a GPU too (ignoring gpu_memory_utilization), and one that cannot fit, or a
    utilization that leaves nothing, is refused with the numbers; an engine's memory comes back once it is dropped."""
    runner = LLM(model_dir, device="cuda", kv_cache_gb=0.5, cuda_graph=False).engine.runner
    assert runner.num_blocks == int(0.5 * 2**30) // runner._block_bytes()
    del runner
    free, total = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match=r"kv_cache_gb=\d+ does not fit: .* GiB of the GPU are free"):
        LLM(model_dir, device="cuda", kv_cache_gb=int(total / 2**30) + 1)
    with pytest.raises(ValueError, match=r"not enough memory for the KV cache: gpu_memory_utilization=0.001 allows"):
        LLM(model_dir, device="cuda", gpu_memory_utilization=0.001)
    # the card's share (gpu_memory_utilization, named: tests default to 1 GiB): the first engine gave its memory back
    big = LLM(model_dir, device="cuda", cuda_graph=False, gpu_memory_utilization=0.9)
    assert big.engine.runner.num_blocks * big.engine.runner._block_bytes() > 0.5 * free


@two_gpus
def test_tensor_parallel_timeline_and_phases(model_dir, tmp_path):
    """`bench throughput -tp 2 --timeline`: every rank replays the timed iteration (its collectives need them all),
    the timeline shows the all-reduces, and the iteration's phases are reported. In a process of its own
    (pytorch#115388, see generate_in_a_process)."""
    import subprocess
    import sys
    out, png = tmp_path / "r.json", tmp_path / "t.png"
    subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "bench", "throughput", "--model", model_dir,
                    "-tp", "2", "--workload", "const:24:8", "--num-requests", "24", "--max-num-seqs", "6",
                    "--max-num-batched-tokens", "64", "--timeline", str(png), "--output", str(out)],
                   check=True, timeout=600)
    r = json.loads(out.read_text())["results"][0]
    ops = r["timeline"]["per_op_ms"]
    assert all(ops[op]["alone"] > 0 and ops[op]["unit"] == "device" for op in ("o_allreduce", "down_allreduce"))
    assert set(r["phase_ms"]) == {"forward", "logits", "sampling"} and r["phase_ms"]["forward"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
