"""The pipeline search (#6) on the CPU: its MILPs on synthetic profiles with known optima, the cyclic model
against an event simulation of the executor's plan, the profiler, the tuned-spec cache and `nanoflow tune`."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from nanoflow.config import PRESETS, preset
from nanoflow.entrypoints.cli import main
from nanoflow.models.llama import LAYER_OPS, MOE_LAYER_OPS, layer_ops
from nanoflow.pipeline import cache, profile
from nanoflow.pipeline.cache import find_tuned, resolve_pipeline_spec, save_tuned
from nanoflow.pipeline.plan import plan
from nanoflow.pipeline.profile import Profile, _grid
from nanoflow.pipeline.search import Order, layer_edges, predict, search, stage1, stage2
from nanoflow.pipeline.spec import PipelineSpec, Unit, load_spec, non_overlap


def synthetic(budget, decode, t, sms=(20, 40, 50, 60, 80, 100), total=100, slowdown=None, context=1280,
              ops=LAYER_OPS):
    """A profile of a layer of `ops` whose op times are t(op, rows, SMs) (µs); slowdown: {"victim|aggressor":
    factor}."""
    rows = {op: _grid(decode if op == "decode_attn" else budget - decode if op == "prefill_attn" else budget)
            for op in ops}
    times = {op: {str(s): [float(t(op, x, s)) for x in rows[op]] for s in sms} for op in ops}
    p = Profile("test-gpu", "shape", "bfloat16", budget, decode, context, total, list(sms), rows, times)
    for pair, f in (slowdown or {}).items():
        p.interference[pair] = {str(s): f for s in sms}
    return p


def two_ops(saturate):
    """gate_up: 10 µs per 128 rows on the whole device, scaling with SMs; decode attention: 10 µs per 128
    rows on `saturate` SMs or more, slower below; every other op free."""
    def t(op, x, s):
        if op == "gate_up":
            return 10 * x / 128 * 100 / s
        if op == "decode_attn":
            return 10 * x / 128 * max(1, saturate / s)
        return 0.0
    return t


def schedule_respects(c, wait_us):
    """Every constraint of the cyclic model holds for the candidate's starts and durations."""
    ops = [n for n in c.spec.scaled(c.spec.tokens) if n.start < n.end]
    sched = c.breakdown["schedule"]
    for i, j, back, gap in layer_edges(ops, wait_us):
        assert sched[j]["start_us"] + back * c.period_us >= sched[i]["start_us"] + sched[i]["dur_us"] + gap - 1e-6


# Two nano-batches of 128 rows, issued A0 A1 B0 B1 (A: up to attention, B: the MLP). With only gate_up (g per
# nano-batch, on the compute unit) and decode attention (m, memory unit) costing anything, layer l + 1's
# decode0 starts when layer l's gate_up1 ends (the compute stream issues layer l + 1 after it), gate_up0
# follows decode0, and gate_up1 follows both decode1 and gate_up0: T = max(2m + g, m + 2g). Non-overlap: 40.
@pytest.mark.parametrize("saturate, slow, shares, period", [
    (20, 1.0, (80, 20), 35.0),  # decode at full speed on 20 SMs: g = 12.5, m = 10 -> max(32.5, 35)
    (20, 1.1, (80, 20), 37.5),  # GEMMs 10% slower beside decode attention: g = 13.75
    (50, 1.0, (60, 40), 1000 / 60 + 1000 / 60 + 12.5),  # decode needs 50 SMs: m = 12.5, g = 16.7: > 40
])
def test_stage2_known_optimum(saturate, slow, shares, period):
    p = synthetic(256, 256, two_ops(saturate), slowdown={"compute|memory": slow})
    c = stage2(p, Order(2, 1, False), [0, 128, 256], wait_us=0)
    assert (c.breakdown["units"]["compute"]["sms"], c.breakdown["units"]["memory"]["sms"]) == shares
    assert c.period_us == pytest.approx(period)
    assert sum(u.sms for u in c.spec.units) <= p.total_sms
    schedule_respects(c, 0)
    # the same as trying every pair of shares that fits
    best = min(predict(spec_with(c.spec, sc, sm), p, 0).period_us for sc in p.sms for sm in p.sms
               if sc + sm <= p.total_sms)
    assert c.period_us == pytest.approx(best)
    ranked = search(p, max_k=2, wait_us=0).candidates
    assert ranked[0].period_us <= period and predict(non_overlap(256), p, 0).period_us == pytest.approx(40)
    # overlap wins only when decode attention runs at full speed on a small share
    assert (ranked[0].spec.name == "non-overlap") == (saturate == 50)


def spec_with(spec, sc, sm):
    units = [Unit("compute", "compute", sc), Unit("memory", "memory", sm)]
    return PipelineSpec(spec.name, spec.tokens, units, spec.nano_ops).validate()


def curvy(op, x, s):
    """Times with kernel floors and wave steps, so that the best boundaries are not obvious."""
    waves = -(-x // 96)
    if op in ("qkv", "o_proj", "gate_up", "down"):
        return 3 + waves * 7 * 100 / s
    if op == "decode_attn":
        return 4 + x * 0.08 * max(1, 30 / s)
    if op == "prefill_attn":
        return 2 + x * 0.02 * 100 / s
    return 1 + x * 0.005


@pytest.mark.parametrize("order", [Order(2, 1, False), Order(3, 1, True), Order(3, 2, False)])
def test_stage1_is_the_best_boundaries(order):
    """Stage 1's boundaries give the least period of every choice of cut positions (brute force)."""
    p = synthetic(512, 200, curvy)
    shares = {"compute": 60, "memory": 40}
    cuts, period = stage1(p, order, shares, wait_us=1.0)
    pos = [0, 128, 200, 256, 384, 512]
    assert set(cuts) <= set(pos) and cuts[0] == 0 and cuts[-1] == 512

    def period_of(cs):
        units = [Unit("compute", "compute", 60), Unit("memory", "memory", 40)]
        return predict(PipelineSpec("x", 512, units, order.nano_ops(cs)).validate(), p, 1.0).period_us
    brute = min(period_of([0, *inner, 512]) for inner in itertools.combinations(pos[1:-1], order.k - 1))
    assert period == pytest.approx(brute, rel=1e-6) and period_of(cuts) == pytest.approx(brute, rel=1e-6)


def simulated_period(spec, durations, layers=72, wait_us=1.0):
    """Run the executor's plan as the GPU would, each stream in order and each launch after its waits
    (plus the cost of a cross-unit wait): the steady-state time per layer."""
    launches = plan(spec.scaled(spec.tokens), layers, spec.units[0].name)
    per_layer = len(durations)
    free, end, layer_end = {}, [], {}
    for i, launch in enumerate(launches):
        assert all(w < i for w in launch.waits)  # waits only on earlier launches: no deadlock
        dur = 0.0 if launch.layer < 0 else durations[(i - 1) % per_layer]
        start = max([free.get(launch.op.unit, 0.0)] + [end[w] + wait_us for w in launch.waits])
        end.append(start + dur)
        free[launch.op.unit] = end[-1]
        layer_end[launch.layer] = max(layer_end.get(launch.layer, 0.0), end[-1])
    return (layer_end[layers - 1] - layer_end[layers - 25]) / 24


def test_cyclic_model_is_what_the_executor_does():
    """predict's period (an LP over the spec's dependencies and stream orders) equals the steady state of an
    event simulation of plan()'s launches, for searched, hand-made and non-overlap specs."""
    p = synthetic(512, 200, curvy)
    specs = [non_overlap(512), load_spec("llama-3-8b-h100-hand"),
             spec_with(PipelineSpec("t", 512, [], Order(4, 2, True).nano_ops([0, 128, 200, 384, 512])), 60, 40),
             spec_with(PipelineSpec("t", 512, [], Order(3, 1, False).nano_ops([0, 128, 256, 512])), 80, 20)]
    for spec in specs:
        spec = PipelineSpec(spec.name, 512, spec.units, spec.scaled(512)).validate()
        c = predict(spec, p, 1.0)
        schedule_respects(c, 1.0)
        sim = simulated_period(spec, [x["dur_us"] for x in c.breakdown["schedule"]])
        assert c.period_us == pytest.approx(sim, rel=1e-6)
        assert c.breakdown["critical"]  # the chain that sets the period is named


# An H100-like roofline, calibrated by BENCHMARKS.md #4: SMs -> (GEMM time / full-device time, decode TB/s)
CUBLAS = {16: (6.45, 0.81), 32: (3.31, 1.59), 48: (2.31, 2.20), 64: (1.76, 2.52), 100: (1.49, 2.72),
          116: (1.36, 2.74), 132: (1.0, 2.75)}
PARTITIONED = {s: (132 / s, min(2.4 * s / 32, 2.75)) for s in CUBLAS}  # #4's targets: ideal GEMMs, fast decode


def h100_like(cfg, budget, decode, context, curve):
    xs = sorted(curve)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    # (N, K) of each GEMM; the experts as the work of a row's top-k experts' MLPs
    gemm = {"qkv": (q + 2 * kv, h), "o_proj": (h, q), "gate_up": (2 * i, h), "down": (h, i),
            "router": (cfg.num_experts, h), "experts": (3 * cfg.num_experts_per_tok * i, h)}

    def t(op, x, s):
        slower, tbs = (np.interp(s, xs, [curve[x][k] for x in xs]) for k in (0, 1))
        if op in gemm:
            return 2 * max(x, 64) * gemm[op][0] * gemm[op][1] / 700e6 * slower + 4
        if op == "decode_attn":
            return x * context * kv * 4 / (tbs * 1e6) + 6
        if op == "prefill_attn":
            return 2 * x * context * q / 350e6 * slower + 6
        return max(x, 64) * 3 * h * 2 / (min(2.8, 0.06 * s) * 1e6) + 3
    return synthetic(budget, decode, t, xs, 132, {"compute|memory": 1.05, "memory|compute": 1.05}, context,
                     layer_ops(1, cfg.is_moe))


@pytest.mark.parametrize("model", ["llama-3-8b", "llama-2-7b", "llama-2-13b", "qwen2-7b", "mistral-7b",
                                   "mixtral-8x7b"])
def test_search_gives_valid_specs_for_every_shape(model):
    p = h100_like(PRESETS[model], 1024, 341, 1280, PARTITIONED)
    found = search(p, max_k=3)
    names = [c.spec.name for c in found.candidates]
    assert "non-overlap" in names and len(names) > 5 and found.milps > 20
    assert all(c.spec.ops == p.ops for c in found.candidates)  # a MoE layer's specs place router and experts
    assert [c.period_us for c in found.candidates] == sorted(c.period_us for c in found.candidates)
    for c in found.candidates[:4] + [found.baseline]:
        spec = PipelineSpec.from_json(c.spec.to_json())  # validates
        assert spec == c.spec and sum(u.sms for u in spec.units) <= 132
        assert simulated_period(spec, [x["dur_us"] for x in c.breakdown["schedule"]], wait_us=2.0) == \
            pytest.approx(c.period_us, rel=1e-6)
    assert found.candidates[0].period_us <= found.baseline.period_us
    if model == "llama-3-8b":  # (Llama-2's MHA: decode attention dominates, there is little to hide)
        # with partition-efficient kernels (#4's targets) the overlap pays, and more than with cuBLAS's curves
        assert found.candidates[0].period_us < 0.8 * found.baseline.period_us
        assert search(h100_like(PRESETS[model], 1024, 341, 1280, CUBLAS), max_k=2).candidates[0].period_us > \
            found.candidates[0].period_us


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "num_layers": 2, "vocab_size": 256}


def test_profiler_on_cpu_is_cached_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    cfg = preset("llama-3-8b", **TINY)
    cpu = torch.device("cpu")
    p = profile.load_or_measure(cfg, torch.float32, cpu, 300, 70, 40, reps=1, progress=False)
    assert p.sms == [1] and p.rows["decode_attn"] == [70] and p.rows["prefill_attn"] == [128, 230]
    assert p.rows["qkv"] == [128, 256, 300] and not p.missing() and p.splits() == []
    assert all(t > 0 for op in LAYER_OPS for t in p.times[op]["1"])
    assert p.time("decode_attn", 100, 300, 0) == 0 and p.time("prefill_attn", 0, 70, 1) == 0
    path = profile.profile_path("cpu", cfg, torch.float32, 300, 70, 40)
    with open(path) as f:
        saved = json.load(f)
    saved["times"]["gate_up"]["1"][1] = None  # as if interrupted there
    with open(path, "w") as f:
        json.dump(saved, f)
    calls = []
    real = profile._cpu_us
    monkeypatch.setattr(profile, "_cpu_us", lambda fn, reps: calls.append(1) or real(fn, reps))
    again = profile.load_or_measure(cfg, torch.float32, cpu, 300, 70, 40, reps=1, progress=False)
    assert len(calls) == 1 and not again.missing()
    assert search(again).candidates[0].spec.name == "non-overlap"  # one CPU "SM": nothing to split


def test_profiler_and_search_on_cpu_for_mixtral(tmp_path, monkeypatch):
    """A MoE layer's profile times router and experts (the experts' cost depends on the routing of the random
    rows); the search gives the non-overlap spec of those ops, and predicts it from them."""
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    cfg = preset("mixtral-8x7b", **TINY, num_experts=4)
    p = profile.load_or_measure(cfg, torch.float32, torch.device("cpu"), 300, 70, 40, reps=1, progress=False)
    assert p.ops == MOE_LAYER_OPS and p.moe and not p.missing()
    assert all(t > 0 for op in p.ops for t in p.times[op]["1"])
    assert "-e4k2" in profile.profile_path("cpu", cfg, torch.float32, 300, 70, 40)
    best = search(p).candidates[0]
    assert best.spec.name == "non-overlap" and best.spec.ops == MOE_LAYER_OPS
    assert best.period_us == pytest.approx(sum(p.time(op, 0, 300, 1) for op in p.ops))


def test_candidates_have_distinct_names(tmp_path):
    """A spec's name tells its order and SM shares, not its cuts: two candidates of other cuts shared one here, and
    tune's --save-candidates wrote the second over the first. The later ones now take -2, -3, ..."""
    from nanoflow.entrypoints.tune import save_candidates
    ranked = search(synthetic(512, 256, two_ops(20)), max_k=3, wait_us=0).candidates
    names = [c.spec.name for c in ranked]
    assert len(set(names)) == len(names) and "tuned-2nb-rev-lag1-c80-m20-2" in names
    save_candidates(ranked, ranked[0], str(tmp_path))
    assert len(os.listdir(tmp_path)) == len(ranked) + 1  # (and ranking.json)


def test_tuned_cache_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    l3, qwen = preset("llama-3-8b"), preset("qwen2-7b")
    assert cache.shape_key(l3) == cache.shape_key(preset("mistral-7b")) != cache.shape_key(qwen)
    assert cache.shape_key(preset("mistral-7b-v0.1")) == cache.shape_key(l3) + "-w4096"  # a window: its own profile
    assert find_tuned("NVIDIA H100 80GB HBM3", qwen, torch.bfloat16, 2048) is None
    assert resolve_pipeline_spec("auto", "NVIDIA H100 80GB HBM3", qwen, torch.bfloat16, 2048) == non_overlap(2048)
    assert resolve_pipeline_spec("auto", "NVIDIA H100 80GB HBM3", l3, "bfloat16", 2048).name == \
        "llama-3-8b-h100-hand"
    spec = stage2(synthetic(256, 256, two_ops(20)), Order(2, 1, False), [0, 128, 256]).spec
    path = save_tuned(spec, cache.cache_key("NVIDIA H100 80GB HBM3", qwen, torch.bfloat16, 2048))
    assert os.path.dirname(path) == str(tmp_path / "tuned")
    assert find_tuned("NVIDIA H100 80GB HBM3", qwen, "bfloat16", 2048) == spec
    assert resolve_pipeline_spec("auto", "NVIDIA H100 80GB HBM3", qwen, "bfloat16", 2048) == spec
    assert find_tuned("NVIDIA H100 80GB HBM3", qwen, "bfloat16", 1024) is None  # another budget
    assert find_tuned("NVIDIA H200", qwen, "bfloat16", 2048) is None
    assert resolve_pipeline_spec("non-overlap", "x", qwen, "bfloat16", 512) == non_overlap(512)
    assert resolve_pipeline_spec(path, "x", qwen, "bfloat16", 512) == spec


def test_tune_cli_on_cpu(llama_dir, tmp_path, monkeypatch, capsys):
    """End to end: profile (measured on the CPU), search, the measuring hook, the cache, --output."""
    from nanoflow.entrypoints import tune
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    args = ["tune", "--model", llama_dir, "--max-num-batched-tokens", "256", "--context", "32", "--device", "cpu"]
    monkeypatch.setattr(tune, "_measure_hook", lambda: None)  # no GPU executor: ranked by prediction
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "by predicted time only" in out and "non-overlap" in out and "<- chosen" in out

    # a GPU-like profile in the cache (as if measured): the search has real choices; the hook's
    # measurements, not the predictions, pick the winner
    from nanoflow.config import ModelConfig
    cfg = ModelConfig.from_file(os.path.join(llama_dir, "config.json"))
    prof = h100_like(PRESETS["llama-3-8b"], 256, 85, 1280, PARTITIONED)  # times that make overlap worth it
    prof.context = 32
    prof.save(profile.profile_path("cpu", cfg, torch.float32, 256, 85, 32))
    calls = []

    def time_iteration(engine_kwargs, model, spec, decode_rows, context, budget):
        calls.append(spec.name)
        assert model == llama_dir and (decode_rows, context, budget) == (85, 32, 256)
        if len(calls) == 3:
            raise RuntimeError("no such SM split")  # a candidate that cannot run is skipped
        return 1.0 if len(calls) == 2 else 2.0  # the second best predicted measures fastest
    monkeypatch.setattr(tune, "_measure_hook", lambda: time_iteration)
    folder = tmp_path / "candidates"
    assert main(args + ["--top", "3", "--output", str(tmp_path / "chosen.json"), "--save-candidates", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "non-overlap" in calls and len(calls) == len(set(calls)) >= 3  # the top 3 and the baseline
    chosen = PipelineSpec.load(str(tmp_path / "chosen.json"))
    assert chosen.name == calls[1] and f"{chosen.name}" in out and "<- chosen" in out
    ranking = json.loads((folder / "ranking.json").read_text())  # measured fastest first, the failed one last
    assert [r["name"] for r in ranking[:2]] == [calls[1], calls[0]] and ranking[0]["chosen"]
    assert ranking[-1]["name"] == calls[2] and ranking[-1]["measured_s_per_iteration"] is None
    assert {r["name"] for r in ranking} == set(calls)
    assert all(PipelineSpec.load(str(folder / f"{r['name']}.json")).name == r["name"] for r in ranking)
    assert find_tuned("cpu", cfg, torch.float32, 256) == chosen
    assert "stage 1:" in out and "critical cycle" in out and f"{calls[2]}: failed to run" in out


# -- tensor parallelism: the collectives on a network unit, the projection's all-gather form ---------------------
def tp_profile(allreduce_us, allgather_us, attn_saturates=True):
    """A TP = 2 profile: gate_up and o_proj / o_gathered scale with SMs, decode attention saturates at 20 SMs (or,
    not saturating, scales like the GEMMs), the collectives cost what is given per 128 rows; everything else is
    free."""
    from nanoflow.pipeline.profile import profiled_ops

    def t(op, x, s):
        per = x / 128
        if op in ("gate_up", "o_proj", "o_gathered"):
            return 10 * per * 100 / s
        if op == "decode_attn":
            return 10 * per * (max(1, 20 / s) if attn_saturates else 100 / s)
        if op.endswith("allreduce"):
            return allreduce_us * per
        if op.endswith("allgather"):
            return allgather_us * per
        return 0.0
    budget, decode, sms = 256, 128, (20, 40, 60, 80, 100)
    ops = profiled_ops(2)
    rows = {op: _grid(decode if op == "decode_attn" else budget - decode if op == "prefill_attn" else budget)
            for op in ops}
    times = {op: {str(s): [float(t(op, x, s)) for x in rows[op]] for s in sms} for op in ops}
    return Profile("test-gpu", "shape", "bfloat16", budget, decode, 1280, 100, list(sms), rows, times, tp_size=2)


@pytest.mark.parametrize("allreduce_us, allgather_us, form", [(8.0, 20.0, "none"), (30.0, 2.0, "all")])
def test_search_places_collectives_on_a_network_unit(allreduce_us, allgather_us, form):
    """The collectives overlap the compute of other nano-batches: the best spec beats non-overlap (which waits for
    each), keeps every collective on one network unit over the whole device, and projects by the all-gather form
    exactly when that is cheaper."""
    from nanoflow.models.llama import NETWORK_OPS, O_ALLGATHER, TP_LAYER_OPS
    p = tp_profile(allreduce_us, allgather_us)
    found = search(p, max_k=2)
    best, base = found.candidates[0], found.baseline
    assert base.spec.ops == TP_LAYER_OPS and best.period_us < base.period_us
    assert best.spec.ops == TP_LAYER_OPS and best.spec.name != "non-overlap"
    units = {u.name: u for u in best.spec.units}
    assert units["network"].sms == 0 and {n.unit for n in best.spec.nano_ops if n.op in NETWORK_OPS} == {"network"}
    gathered = {n.start for n in best.spec.nano_ops if n.op in O_ALLGATHER}
    assert bool(gathered) == (form != "none")
    assert predict(best.spec, p).period_us == pytest.approx(best.period_us, rel=1e-6)
    schedule_respects(best, 2.0)
    assert any("all-gather" in n for n in found.notes)


def test_search_overlaps_only_the_collectives_when_a_split_cannot_pay():
    """Decode attention that scales with SMs like the GEMMs gains nothing from a share of its own; the collectives
    still overlap: the best spec keeps every other op on one compute unit over the whole device, with the
    collectives on the network unit beside it, and beats non-overlap by about the collectives' time."""
    from nanoflow.models.llama import NETWORK_OPS
    p = tp_profile(5.0, 60.0, attn_saturates=False)
    found = search(p, max_k=2)
    best, base = found.candidates[0], found.baseline
    assert {u.name: u.sms for u in best.spec.units} == {"compute": 0, "network": 0}
    assert {n.unit for n in best.spec.nano_ops} == {"compute", "network"}
    assert {n.unit for n in best.spec.nano_ops if n.op in NETWORK_OPS} == {"network"}
    hidden = base.period_us - best.period_us  # non-overlap: 50 µs of compute, then 2 all-reduces of 10 µs
    assert 10 < hidden <= 20 + 1e-6
    assert predict(best.spec, p).period_us == pytest.approx(best.period_us, rel=1e-6)
    schedule_respects(best, 2.0)


def test_collectives_timed_in_processes():
    """gloo on the CPU: every collective of a TP = 2 layer timed at each row count."""
    from nanoflow.pipeline.collectives import time_collectives
    cfg = preset("llama-3-8b", **TINY)
    got = time_collectives(cfg, torch.float32, "cpu", 2, {"o_allreduce": [8, 16], "attn_allgather": [8],
                                                          "o_allgather": [8]}, reps=2)
    assert {op: len(v) for op, v in got.items()} == {"o_allreduce": 2, "attn_allgather": 1, "o_allgather": 1}
    assert all(t > 0 for v in got.values() for t in v)


def test_tune_cli_tensor_parallel_on_cpu(llama_dir, tmp_path, monkeypatch, capsys):
    """`tune -tp 2`: a shard's ops profiled, the collectives timed by two processes, the candidates timed on both
    ranks; the spec is saved where a rank's `auto` finds it, all-reduces included, and where TP = 1 of a model with
    the shard's shape does not (it found the TP spec, and failed on its all-reduces)."""
    from nanoflow.config import ModelConfig
    from nanoflow.models.llama import TP_LAYER_OPS
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    assert main(["tune", "--model", llama_dir, "-tp", "2", "--max-num-batched-tokens", "128", "--context",
                 "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("measured ms/iteration"):].split("\n\n")[0].splitlines()[1:]
    measured = {line.split()[0]: float(line.split()[2]) for line in table}  # every candidate ran, on both ranks
    chosen = next(line.split()[0] for line in table if line.endswith("<- chosen"))
    assert "non-overlap" in measured and measured[chosen] == min(measured.values()) > 0
    prof = Profile.load(profile.profile_path("cpu", ModelConfig.from_file(os.path.join(llama_dir, "config.json")),
                                             torch.float32, 128, 42, 16, 2))
    assert prof.tp_size == 2 and not prof.missing_collectives() and prof.times["o_gathered"]["1"][0] > 0
    shard = ModelConfig.from_file(os.path.join(llama_dir, "config.json")).shard(2)
    assert resolve_pipeline_spec("auto", "cpu", shard, torch.float32, 128, 2).ops == TP_LAYER_OPS
    assert resolve_pipeline_spec("auto", "cpu", shard, torch.float32, 128) == non_overlap(128)


@pytest.mark.parametrize("content", ["not json", '{"gpu": 5}', "[1, 2]", "\udcff"])
def test_a_cached_profile_that_is_not_one_is_named(tmp_path, content):
    """(A corrupt profile, or another version's, gave JSON's or the constructor's error, naming no file.)"""
    path = tmp_path / "p.json"
    path.write_text(content, errors="surrogateescape")
    with pytest.raises(ValueError, match=f"the cached profile {path} is not one this version reads .*: delete it"):
        Profile.load(str(path))


@pytest.mark.parametrize("edit", [lambda d: d["times"].pop("act"), lambda d: d["times"]["qkv"]["20"].pop(),
                                  lambda d: d["times"]["down"]["100"].__setitem__(0, "1.5"),
                                  lambda d: d["rows"]["gate_up"].pop()])
def test_a_cached_profile_with_broken_tables_is_named(tmp_path, edit):
    """(A hand-edited profile lacking an op's times raised a KeyError deep in the search; a string time or a row
    list of the wrong length, numpy's error naming no file.)"""
    path = str(tmp_path / "p.json")
    synthetic(256, 64, two_ops(20)).save(path)
    assert Profile.load(path).times["act"]
    d = json.loads(open(path).read())
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=f"the cached profile {path} is not one this version reads .*: delete it"):
        Profile.load(path)


def test_tune_cli_on_cpu_for_mixtral(tmp_path, monkeypatch, capsys):
    """`nanoflow tune` of a MoE model: its profile, search and the tuned spec (of its ops) in the cache."""
    from conftest import make_hf_model
    from nanoflow.config import ModelConfig
    from nanoflow.entrypoints import tune
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    path = str(tmp_path / "mixtral")
    make_hf_model(path, "mixtral", None)
    monkeypatch.setattr(tune, "_measure_hook", lambda: None)
    assert main(["tune", "--model", path, "--max-num-batched-tokens", "128", "--context", "32", "--device", "cpu"]) == 0
    assert "<- chosen" in capsys.readouterr().out
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    assert find_tuned("cpu", cfg, torch.float32, 128).ops == MOE_LAYER_OPS


def test_steady_batch_reuses_blocks_past_the_cache():
    """tune's steady batch on a cache smaller than its KV (Mixtral on one H200): every block id and slot inside the
    cache, the same sequences and positions as with blocks to spare."""
    whole, need = profile.steady_batch(256, 85, 40, 16, 1000)
    cut, same = profile.steady_batch(256, 85, 40, 16, 1000, max_blocks=50)
    assert need == same > 50 and max(b for t in whole.block_tables for b in t) == need - 1
    assert max(b for t in cut.block_tables for b in t) < 50 and int(cut.slot_mapping.max()) < 50 * 16
    assert torch.equal(cut.positions, whole.positions) and cut.seq_lens == whole.seq_lens


def test_candidates_timed_with_hf_overrides(llama_dir):
    """tune's timing engine takes the engine options as given, dicts included (hf_overrides made its cache key
    unhashable: tune failed after its profile and search); one engine serves the candidates."""
    from nanoflow.pipeline import measure
    kw = dict(max_num_batched_tokens=128, num_kv_blocks=64, block_size=4, device="cpu",
              hf_overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
              override_generation_config={"temperature": 0.5})
    try:
        for _ in range(2):
            assert measure.time_iteration(kw, llama_dir, non_overlap(128), 20, 16, 128, reps=2) > 0
        (engine,) = measure._engines.values()
        assert engine.model_config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    finally:
        measure.close()


def test_tp_candidates_timed_on_every_rank(llama_dir):
    """A candidate with collectives, the all-gather form in one nano-batch, timed by a TP = 2 engine (gloo): every
    rank runs it (or the collectives would hang), and the engine then still generates as TP = 1 does."""
    from nanoflow import LLM, SamplingParams
    from nanoflow.models.llama import NETWORK_OPS, O_ALLGATHER, O_ALLREDUCE, TP_LAYER_OPS
    from nanoflow.pipeline import measure
    from nanoflow.pipeline.spec import NanoOp
    ops = [NanoOp(n, s, e, "net" if n in NETWORK_OPS else "compute")
           for i, (s, e) in enumerate(((0, 64), (64, 128))) for op in TP_LAYER_OPS
           for n in ((O_ALLGATHER if op == "o_proj" else ()) if i == 0 and op in O_ALLREDUCE else (op,))]
    spec = PipelineSpec("ag", 128, [Unit("compute", "compute"), Unit("net", "network")], ops).validate()
    kw = dict(max_num_batched_tokens=128, num_kv_blocks=64, block_size=4, device="cpu")
    try:
        assert measure.time_iteration(dict(kw, tensor_parallel_size=2), llama_dir, spec, 20, 16, 128, reps=2) > 0
        with pytest.raises(ValueError, match="does not fit"):  # every rank refuses it; the worker stays
            measure.time_iteration(dict(kw, tensor_parallel_size=2), llama_dir, spec, 200, 16, 128)
        assert measure.time_iteration(dict(kw, tensor_parallel_size=2), llama_dir, spec, 20, 16, 128, reps=2) > 0
        (engine,) = measure._engines.values()
        p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        ref = LLM(llama_dir, **kw).generate([[5, 6, 7, 8]], p, use_tqdm=False)
        engine.add_request("0", [5, 6, 7, 8], p)
        done = []
        while engine.has_unfinished_requests():
            done += [o for o in engine.step() if o.finished]
        assert done[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    finally:
        measure.close()
