"""Tensor parallelism: the sharded model, the all-reduces as pipeline ops, and TP = 2 (gloo, two processes) giving
the outputs of TP = 1."""
import argparse
import multiprocessing
import os
import signal
import time

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.config import preset
from nanoflow.distributed.parallel_state import TPGroup
from nanoflow.entrypoints.cli import main
from nanoflow.models.llama import NETWORK_OPS, O_ALLGATHER, O_ALLREDUCE, TP_LAYER_OPS, LlamaModel, layer_ops
from nanoflow.models.loader import ModelSource, build_model, resolve
from nanoflow.pipeline.graph import dependencies, previous_layer_dependencies
from nanoflow.pipeline.spec import NanoOp, PipelineSpec, Unit, load_spec, non_overlap


def assert_shards(whole, source, load_format="auto"):
    """Each rank's parameters are its slices of the whole model's: column-parallel rows (its q, k and v heads; its
    slice of gate and of up), row-parallel columns, the vocabulary's rows (the last rank's slice may be padded)."""
    cfg = whole.cfg
    q, kv, i = cfg.q_size // 2, cfg.kv_size // 2, cfg.intermediate_size // 2
    for r in range(2):
        part = build_model(source, load_format, torch.float32, torch.device("cpu"), 64, tp=TPGroup(r, 2))
        assert (part.cfg.num_heads, part.cfg.num_kv_heads) == (cfg.num_heads // 2, cfg.num_kv_heads // 2)
        for w, p in zip(whole.layers, part.layers):
            rows = [slice(r * q, (r + 1) * q), slice(2 * q + r * kv, 2 * q + (r + 1) * kv),
                    slice(2 * q + 2 * kv + r * kv, 2 * q + 2 * kv + (r + 1) * kv)]
            assert torch.equal(p.qkv, torch.cat([w.qkv[s] for s in rows]))
            gate, up = w.gate_up[r * i:(r + 1) * i], w.gate_up[2 * i + r * i:2 * i + (r + 1) * i]
            assert torch.equal(p.gate_up, torch.cat([gate, up]))
            assert torch.equal(p.o, w.o[:, r * q:(r + 1) * q]) and torch.equal(p.down, w.down[:, r * i:(r + 1) * i])
            assert torch.equal(p.attn_norm, w.attn_norm) and torch.equal(p.mlp_norm, w.mlp_norm)
        start = r * part.vocab_rows
        n = min(part.vocab_rows, cfg.vocab_size - start)
        assert torch.equal(part.embed[:n], whole.embed[start:start + n])
        assert torch.equal(part.lm_head[:n], whole.lm_head[start:start + n])


def test_dummy_shards_are_slices_of_the_whole():
    """Every rank draws the whole tensors and keeps its part (vocabulary 1001 = 2 x 501 - 1: padded)."""
    cfg = preset("llama-2-7b", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=1001)
    src = ModelSource("preset", "tiny", cfg)
    assert_shards(build_model(src, "dummy", torch.float32, torch.device("cpu"), 64), src, "dummy")


def test_safetensors_shards(llama_dir):
    """Each rank reads its part of each tensor (safetensors slices)."""
    src = resolve(llama_dir)
    assert_shards(build_model(src, "auto", torch.float32, torch.device("cpu"), 64), src)


def test_shard_needs_divisible_heads():
    with pytest.raises(ValueError, match="tensor_parallel_size 16 must divide the model.s num_key_value_heads"):
        preset("llama-3-8b").shard(16)
    with pytest.raises(ValueError, match="must divide the model's num_attention_heads"):
        preset("llama-3-8b").shard(3)


def test_network_ops_in_a_spec():
    """The all-reduces on a network unit: the spec validates, their readers wait for them, and the plain spec of a
    tensor-parallel model runs each right after its producer."""
    units = [Unit("compute", "compute"), Unit("net", "network")]
    ops = [NanoOp(op, s, e, "net" if op.endswith("allreduce") else "compute")
           for s, e in ((0, 32), (32, 64)) for op in TP_LAYER_OPS]
    spec = PipelineSpec("tp", 64, units, ops).validate()
    assert spec.ops == TP_LAYER_OPS and spec.for_tensor_parallel(2) is spec
    mlp_norm = next(n for n in ops if n.op == "mlp_norm" and n.start == 32)
    assert [(d.op, d.start) for d in dependencies(mlp_norm, ops)] == [("o_allreduce", 32)]
    attn_norm = next(n for n in ops if n.op == "attn_norm" and n.start == 0)
    assert [(d.op, d.start) for d in previous_layer_dependencies(attn_norm, ops)] == [("down_allreduce", 0)]
    with pytest.raises(ValueError, match="is for tensor parallelism"):
        spec.for_tensor_parallel(1)
    with pytest.raises(ValueError, match="issued before its input o_allreduce"):
        late = [n for n in ops if n.op != "o_allreduce"] + [n for n in ops if n.op == "o_allreduce"]
        PipelineSpec("late", 64, units, late).validate()
    with pytest.raises(ValueError, match="they must share one"):
        PipelineSpec("split", 64, units, [NanoOp(n.op, n.start, n.end, "compute" if n.start else n.unit)
                                          for n in ops]).validate()
    # the all-gather form for the first rows: its ops chain, mlp_norm reads whichever form made its rows
    mixed = PipelineSpec("mixed", 64, units, _tp_ops(((0, 32), (32, 64)), gather_first=True)).validate()
    first = {n.op: n for n in mixed.nano_ops if n.start == 0}
    assert "o_proj" not in first and set(O_ALLGATHER) <= set(first)
    assert [d.op for d in dependencies(first["o_gathered"], mixed.nano_ops)] == ["attn_allgather"]
    assert [d.op for d in dependencies(first["mlp_norm"], mixed.nano_ops)] == ["o_allgather"]
    assert {d.op for d in dependencies(first["attn_allgather"], mixed.nano_ops)} == {"decode_attn", "prefill_attn"}
    with pytest.raises(ValueError, match="o_proj and o_gathered must cover"):
        PipelineSpec("both", 64, units, mixed.nano_ops + [NanoOp("o_proj", 0, 32, "compute"),
                                                          NanoOp("o_allreduce", 0, 32, "net")]).validate()
    with pytest.raises(ValueError, match="must have the same nano-batches"):
        PipelineSpec("half", 64, units, [n for n in mixed.nano_ops if n.op != "o_allgather"]).validate()
    hand = load_spec("llama-3-8b-h100-hand").for_tensor_parallel(2)
    assert len({n.unit for n in hand.nano_ops if n.op in NETWORK_OPS}) == 1
    plain = non_overlap(64).for_tensor_parallel(2)
    assert plain.ops == TP_LAYER_OPS and [n.op for n in plain.nano_ops] == list(TP_LAYER_OPS)
    assert non_overlap(64, 2).nano_ops == plain.nano_ops
    moe = non_overlap(64, moe=True).for_tensor_parallel(2)  # down_allreduce after experts
    assert moe.ops == layer_ops(2, moe=True) and [n.op for n in moe.nano_ops] == list(moe.ops)
    assert non_overlap(64, 2, moe=True).nano_ops == moe.nano_ops


# -- TP = 2 in processes (gloo) vs TP = 1 ------------------------------------------------------------------------
# A small token budget: prompts are prefilled in chunks, alongside the decodes of others.
ENGINE = dict(max_num_batched_tokens=16, max_num_seqs=8, num_kv_blocks=64, block_size=4, device="cpu")  # (gloo, fp32)
PROMPTS = [[5, 17, 923, 4410, 88, 2011, 7, 301, 12, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
           [1000, 2000, 3000], [77] * 30, list(range(100, 125))]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


def assert_same(outs, refs):
    """Tokens identical, the sampled tokens' logprobs within 1e-4 (fp32)."""
    for out, ref in zip(outs, refs):
        o, r = out.outputs[0], ref.outputs[0]
        assert o.token_ids == r.token_ids
        for got, want, t in zip(o.logprobs, r.logprobs, o.token_ids):
            assert got[t].logprob == pytest.approx(want[t].logprob, abs=1e-4)
            assert set(got) == set(want)


def _tp_ops(rows, gather_first=False):
    """TP_LAYER_OPS over each range of rows, collectives on the unit 'net'; the first range's projection in the
    all-gather form if asked."""
    ops = []
    for i, (s, e) in enumerate(rows):
        for op in TP_LAYER_OPS:
            if gather_first and i == 0 and op in O_ALLREDUCE:
                names = O_ALLGATHER if op == "o_proj" else ()
            else:
                names = (op,)
            ops += [NanoOp(n, s, e, "net" if n in NETWORK_OPS else "compute") for n in names]
    return ops


@pytest.mark.parametrize("gather_first", [False, True], ids=["allreduce", "allgather-then-allreduce"])
def test_tp2_qwen2_pipeline_spec_with_network_unit(tmp_path, tokenizer_dir, gather_first):
    """Qwen2 (qkv bias, tied embeddings; a vocabulary of odd size, so the last rank's slice is padded), nano-batched
    by a spec that puts the collectives on a network unit, through the graph path's static buffers; the first
    nano-batch's attention output projected by the all-gather form, if asked."""
    from conftest import make_hf_model
    path = str(tmp_path / "qwen2")
    make_hf_model(path, "qwen2", tokenizer_dir, seed=2, vocab_size=49153)
    units = [Unit("compute", "compute"), Unit("net", "network")]
    ops = _tp_ops(((0, 8), (8, 16)), gather_first)
    spec = str(tmp_path / "tp.json")
    PipelineSpec("tp", 16, units, ops).validate().save(spec)
    refs = LLM(path, **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, mode="nanobatch-only", pipeline_spec=spec, cuda_graph=True, **ENGINE)
    try:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), refs)
    finally:
        llm.shutdown()


def test_tp2_takes_hf_overrides(tmp_path):
    """hf_overrides reach every rank: YaRN set over a config without it, at TP = 2, gives the outputs of the model
    saved with it (a rank that built plain rope would diverge)."""
    from conftest import ARCH_CONFIGS, make_hf_model
    yarn = ARCH_CONFIGS["qwen3"]["rope_scaling"]
    make_hf_model(str(tmp_path / "plain"), "qwen3", None, seed=3, rope_scaling=None)
    make_hf_model(str(tmp_path / "yarn"), "qwen3", None, seed=3)
    refs = LLM(str(tmp_path / "yarn"), **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(str(tmp_path / "plain"), tensor_parallel_size=2, hf_overrides={"rope_scaling": yarn}, **ENGINE)
    try:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), refs)
    finally:
        llm.shutdown()


def assert_expert_shards(whole, source, load_format="auto"):
    """Each rank holds every expert's slice: its rows of gate and of up, the matching columns of down (the shared
    expert's too, if any); the router and the shared expert's gate whole."""
    i, s = whole.cfg.intermediate_size // 2, whole.cfg.shared_expert_intermediate_size // 2
    for r in range(2):
        part = build_model(source, load_format, torch.float32, torch.device("cpu"), 64, tp=TPGroup(r, 2))
        for w, p in zip(whole.layers, part.layers):
            gate, up = w.experts_gate_up[:, r * i:(r + 1) * i], w.experts_gate_up[:, (2 + r) * i:(3 + r) * i]
            assert torch.equal(p.experts_gate_up, torch.cat([gate, up], dim=1))
            assert torch.equal(p.experts_down, w.experts_down[:, :, r * i:(r + 1) * i])
            assert torch.equal(p.router, w.router)
            if s:
                gate, up = w.shared_gate_up[r * s:(r + 1) * s], w.shared_gate_up[(2 + r) * s:(3 + r) * s]
                assert torch.equal(p.shared_gate_up, torch.cat([gate, up]))
                assert torch.equal(p.shared_down, w.shared_down[:, r * s:(r + 1) * s])
                assert torch.equal(p.shared_gate, w.shared_gate)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_tp2_moe_matches_tp1(tmp_path, arch):
    """Experts (and Qwen2-MoE's shared expert) split over two ranks (safetensors slices, and dummy weights drawn
    whole): the partial outputs summed by down_allreduce give TP = 1's outputs."""
    from conftest import make_hf_model
    path = str(tmp_path / arch)
    make_hf_model(path, arch, None, seed=3)
    src = resolve(path)
    assert_expert_shards(build_model(src, "auto", torch.float32, torch.device("cpu"), 64), src)
    assert_expert_shards(build_model(src, "dummy", torch.float32, torch.device("cpu"), 64), src, "dummy")
    refs = LLM(path, **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        assert llm.engine.runner.model.ops == layer_ops(2, moe=True)
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), refs)
    finally:
        llm.shutdown()


def test_cli_flag():
    from nanoflow.entrypoints.cli import add_engine_args, engine_kwargs
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["-tp", "2"]))["tensor_parallel_size"] == 2
    assert p.parse_args(["--tensor-parallel-size", "4"]).tensor_parallel_size == 4


def test_a_rank_that_dies_at_start_is_an_error_at_once(llama_dir, tmp_path):
    """A script without a main guard: spawn's import of it fails in the new rank, which exits; rank 0 says so at
    once (it waited the group's ten minutes for it)."""
    import subprocess
    import sys
    script = tmp_path / "noguard.py"
    script.write_text(f"from nanoflow import LLM\nLLM({llama_dir!r}, tensor_parallel_size=2, device='cpu')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "guard its work with `if __name__ == '__main__':`" in run.stderr


def test_bad_tensor_parallel_size(llama_dir, monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the model's num_attention_heads"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=0)
    monkeypatch.setattr("nanoflow.distributed.worker.os.cpu_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 is more than the 1 CPU cores available"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=2)
    monkeypatch.undo()
    monkeypatch.setenv("NANOFLOW_ALL_REDUCE", "ncl")
    with pytest.raises(ValueError, match="NANOFLOW_ALL_REDUCE='ncl': expected one of auto, nccl, symm-mem"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=2)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("nanoflow-tp")]
    monkeypatch.undo()
    # a failure on rank 0 after the workers started (here every rank finds no room for the KV cache) leaves none behind
    with pytest.raises(ValueError, match="the KV cache holds no block"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=2, kv_cache_gb=1e-9)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("nanoflow-tp")]
    assert not torch.distributed.is_initialized()


def test_a_dead_worker_stops_the_engine_and_health_says_so(llama_dir):
    """A tensor-parallel worker killed under a serving engine: the next iteration fails its requests as the engine's
    loss (EngineLost: 503, retry, not gloo's socket error as a 500) and the engine stops (alive false: /health and
    new requests 503), rather than failing every request while reported healthy (a data-parallel replica then
    exits, for Ray to restart it)."""
    import asyncio
    from nanoflow.entrypoints.async_engine import AsyncEngine, EngineLost, Overloaded, Submission, _Sink
    from nanoflow.entrypoints.metrics import Metrics
    llm = LLM(llama_dir, tensor_parallel_size=2, **ENGINE)
    served = AsyncEngine(llm.engine, Metrics(), 64)
    served.start()
    p = SamplingParams(max_tokens=3, ignore_eos=True)

    async def run():
        assert [o async for _, o in await served.submit([[1, 2, 3]], p)][-1].finished
        stream = await served.submit([[1, 2, 3]], SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(aiter(stream))  # (running)
        os.kill(llm.engine.workers.procs[0].pid, signal.SIGKILL)
        # (not alive as soon as the process is gone: a collective may hang a while before the step fails, NCCL's)
        for _ in range(500):
            if not served.alive:
                break
            await asyncio.sleep(0.01)
        assert not served.alive
        with pytest.raises(EngineLost, match="the engine stopped: tensor-parallel workers nanoflow-tp1 exited"):
            [o async for _, o in stream]  # (the step failed on gloo's closed socket)
        served._thread.join(10)
        assert not served.alive and served.lost == "tensor-parallel workers nanoflow-tp1 exited"
        with pytest.raises(Overloaded, match="the engine is not running"):
            await served.submit([[1, 2, 3]], p)
        # a submission that came while the engine thread stopped (after its last look at the queue) is answered
        sink = _Sink(asyncio.get_running_loop())
        served._add(Submission(["late-0"], [[1, 2, 3]], p, sink))
        with pytest.raises(EngineLost, match="the engine stopped: tensor-parallel workers nanoflow-tp1 exited"):
            raise await asyncio.wait_for(sink.queue.get(), 5)
    try:
        asyncio.run(run())
    finally:
        llm.shutdown()


@pytest.mark.parametrize("stop_first", [False, True], ids=["watcher-first", "stop-first"])
def test_a_dead_worker_fails_the_requests_of_a_step_stuck_in_a_collective(llama_dir, monkeypatch, stop_first):
    """NCCL's collectives wait for a peer that exited (the watchdog's abort is off), and the engine thread with them:
    the requests in flight then fail from the watcher, the engine stops, and stop() does not wait for that thread,
    also when it comes before the watcher acts (stop_first: a SIGTERM as the workers die). Here the step is held
    (as a hung collective would hold it) and gloo's error comes only once it is released."""
    import asyncio
    import threading
    from nanoflow.entrypoints import async_engine
    from nanoflow.entrypoints.async_engine import AsyncEngine, EngineLost, Overloaded
    from nanoflow.entrypoints.metrics import Metrics
    from nanoflow.distributed import parallel_state
    stuck_s = 2.0 if stop_first else 0.5
    monkeypatch.setattr(async_engine, "STUCK_S", stuck_s)
    monkeypatch.setattr(parallel_state, "_abandoned", False)  # (the watcher leaves the group behind: restored after)
    llm = LLM(llama_dir, tensor_parallel_size=2, **ENGINE)
    served = AsyncEngine(llm.engine, Metrics(), 64)
    served.start()
    step, held, release = llm.engine.step, threading.Event(), threading.Event()

    def stuck_step():
        held.set()
        release.wait()
        return step()

    async def drain(stream):
        return [o async for _, o in stream]

    async def run():
        streams = [await served.submit([[1, 2, 3 + i]], SamplingParams(max_tokens=100, ignore_eos=True))
                   for i in range(2)]
        await anext(aiter(streams[0]))  # (running)
        llm.engine.step = stuck_step
        await asyncio.to_thread(held.wait, 10)
        os.kill(llm.engine.workers.procs[0].pid, signal.SIGKILL)
        if stop_first:
            while not llm.engine.lost_workers():
                await asyncio.sleep(0.01)
            t = time.monotonic()
            await asyncio.to_thread(served.stop)
            assert time.monotonic() - t < stuck_s + 1
        for stream in streams:  # (after the outputs they had)
            with pytest.raises(EngineLost, match="tensor-parallel workers nanoflow-tp1 exited"):
                await asyncio.wait_for(drain(stream), 10)
        assert served._thread.is_alive() and not served.alive  # (the engine thread still in its step)
        assert parallel_state.group_abandoned()  # (so the CLI ends the process without finalizing)
        with pytest.raises(Overloaded, match="the engine is not running"):
            await served.submit([[1, 2, 3]], SamplingParams(max_tokens=3))
    try:
        asyncio.run(run())
        if not stop_first:
            served.stop()  # (bounded: the thread is stuck)
        assert served._thread.is_alive()
        release.set()  # the step goes on, fails on the peer's closed socket, and the thread ends
        served._thread.join(10)
        assert not served._thread.is_alive() and served.lost == "tensor-parallel workers nanoflow-tp1 exited"
    finally:
        release.set()
        llm.shutdown()


def _tp_worker_pids(pid: int) -> list[int]:
    """The tensor-parallel workers among a process's children (spawned: their command line runs spawn_main)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(k) for k in f.read().split()]
    return [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads a process's children from /proc (Linux)")
@pytest.mark.parametrize("keep_alive", [False, True], ids=["exits", "kept-alive"])
def test_serve_exits_when_its_engine_stops_for_good(llama_dir, tmp_path, monkeypatch, keep_alive):
    """A tensor-parallel worker killed under `nanoflow serve`: the server exits 1, as vLLM's does when its engine
    dies, for a supervisor to restart it; with $NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH=1 it stays up, health 503."""
    import httpx
    from conftest import start_server, stop_server
    if keep_alive:
        monkeypatch.setenv("NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    proc, url = start_server([llama_dir, "--device", "cpu", "-tp", "2", "--max-model-len", "64", "--num-kv-blocks",
                              "64", "--block-size", "4"], tmp_path / "log")
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        (worker,) = _tp_worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        if keep_alive:
            deadline = time.monotonic() + 30  # (health says 503 at once; the engine stops within STUCK_S)
            while "the engine stops:" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # (past the server's next looks at its engine, every 0.1 s)
            assert httpx.get(f"{url}/health").status_code == 503 and proc.poll() is None
            assert stop_server(proc) == 0
        else:
            assert proc.wait(60) == 1
        log = (tmp_path / "log").read_text()
        assert ("the server exits: the engine stopped for good (tensor-parallel workers nanoflow-tp1 exited)" in log) \
            != keep_alive, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_keep_alive_on_engine_death_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH", "yes")  # (refused before the model loads: none here)
    assert main(["serve", str(tmp_path / "no-model"), "--device", "cpu", "--port", "0"]) == 2
    assert "NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH='yes': must be 0, 1, false or true" in capsys.readouterr().err


# (after the tests above: one tensor-parallel engine per process at a time)
@pytest.fixture(scope="module")
def llama_tp(llama_dir):
    llm = LLM(llama_dir, tensor_parallel_size=2, **ENGINE)
    procs = list(llm.engine.workers.procs)
    yield llm
    llm.shutdown()
    assert [p.exitcode for p in procs] == [0]  # each worker left its loop and exited


def test_tp2_matches_tp1(llama_dir, llama_tp):
    """Synchronous, then asynchronous scheduling (rank 0 sends the tokens it sampled last on the device); the second
    run also reuses the prefix cache's blocks, which every rank's KV cache holds."""
    refs = LLM(llama_dir, **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False)
    for async_scheduling in (False, True):
        llama_tp.engine.async_scheduling = async_scheduling
        assert_same(llama_tp.generate(PROMPTS, PARAMS, use_tqdm=False), refs)


def _count_races(monkeypatch) -> list:
    calls = []
    race = LlamaModel.race_tokens
    monkeypatch.setattr(LlamaModel, "race_tokens", lambda self, *a: calls.append(1) or race(self, *a))
    return calls


def test_tp2_greedy_race_matches_tp1(llama_dir, llama_tp, monkeypatch):
    """Greedy rows without logprobs: the ranks race over their vocabulary slices (no logits gathered), and the
    tokens are TP = 1's."""
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    refs = LLM(llama_dir, **ENGINE).generate(PROMPTS, plain, use_tqdm=False)
    races = _count_races(monkeypatch)
    outs = llama_tp.generate(PROMPTS, plain, use_tqdm=False)
    assert races and [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]


def test_tp2_race_samples_softmax_over_the_whole_vocabulary(llama_dir, llama_tp, monkeypatch):
    """Sampled rows raced per rank follow softmax(logits / T) over the whole vocabulary: the first token's
    frequencies over 600 draws against HF's logits, at a temperature where both ranks' slices hold a good share
    of the probability (so the best of the ranks' winners decides)."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    half = llama_tp.engine.runner.model.vocab_rows
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0, -1]
        for t in (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1):
            p = (logits / t).softmax(0)
            if min(p[:half].sum(), p[half:].sum()) > 0.2 and p.max() < 0.6 and (p > 0.02).sum() >= 3:
                break
        else:
            continue
        break
    else:
        pytest.fail("no prompt whose likely first tokens lie in both vocabulary slices")
    races = _count_races(monkeypatch)
    n = 600
    outs = llama_tp.generate([prompt] * n, SamplingParams(temperature=t, max_tokens=1, ignore_eos=True),
                             use_tqdm=False)
    got = torch.tensor([o.outputs[0].token_ids[0] for o in outs])
    assert races
    likely = (p > 0.02).nonzero()[:, 0]
    for i in likely.tolist() + [None]:  # each likely token, then all the others together
        pi = p[i].item() if i is not None else 1 - p[likely].sum().item()
        freq = ((got == i) if i is not None else ~torch.isin(got, likely)).float().mean().item()
        assert abs(freq - pi) < 4 * (pi * (1 - pi) / n) ** 0.5 + 0.01, (i, freq, pi)


def test_a_hung_nccl_teardown_is_bounded(monkeypatch):
    """NCCL's teardown can hang after CUDA graphs captured its collectives (pytorch#115388): close_group gives it a
    bounded time, reports that the group was left behind, and a later engine in this process is refused with a
    message that says why."""
    import threading
    import torch.distributed as dist
    from nanoflow.distributed import parallel_state
    hang = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", hang.wait)
    monkeypatch.setattr(parallel_state, "_abandoned", False)
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert parallel_state.close_group(abort=True, timeout_s=0.2) is False
    hang.set()
    with pytest.raises(RuntimeError, match="could not leave its NCCL group"):
        parallel_state.check_can_start()


def test_cli_exits_without_finalizing_after_a_hung_teardown():
    """The CLI stops a tensor-parallel engine the command left running before it returns. If the group's teardown
    hangs there, it ends by os._exit with the command's code: finalizing the interpreter would abort (SIGABRT) on
    the thread stuck in NCCL's teardown, as `bench throughput -tp 2` did on 2 x H100 (twice: the second time the
    teardown ran at exit, after the CLI had checked)."""
    import subprocess
    import sys
    script = ("import atexit, sys\n"
              "from nanoflow.distributed import parallel_state, worker\n"
              "from nanoflow.entrypoints.cli import main\n"
              "class Hung:  # a live group whose teardown hangs\n"
              "    def shutdown(self):\n"
              "        worker._running.remove(self)\n"
              "        parallel_state._abandoned = True\n"
              "worker._running.append(Hung())\n"
              "atexit.register(lambda: print('finalized'))\n"
              "print('ran', flush=False)\n"
              "sys.exit(main(['serve', '--model', '/no/such/model', '--stream-interval', '0']))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--stream-interval must be >= 1" in r.stderr
    assert "ran" in r.stdout and "finalized" not in r.stdout  # stdout flushed; no atexit, no finalizing
