"""The benchmark driver, workloads and cost model (on the CPU default model)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nanoflow.bench import cost_model
from nanoflow.bench.workloads import MAX_OUTPUT, MAX_PROMPT, TRACES, load_trace, parse
from nanoflow.config import preset
from nanoflow.entrypoints.cli import main


def test_workloads():
    w = parse("const:100:20", num_requests=7)
    assert w.lengths == [(100, 20)] * 7 and w.total_tokens == 840
    prompts = w.prompts(vocab_size=50, seed=1)
    assert len(prompts) == 7 and all(len(p) == 100 and max(p) < 50 for p in prompts)
    assert prompts == w.prompts(vocab_size=50, seed=1)
    # another stream (a bench's next workload or rate) shares no prompt's start with the first
    other = w.prompts(vocab_size=50, seed=1, stream=1)
    assert not {tuple(p[:16]) for p in prompts} & {tuple(p[:16]) for p in other}
    for name in TRACES:
        rows = load_trace(name)
        assert len(rows) > 10000 and all(0 < p <= MAX_PROMPT and 0 < o <= MAX_OUTPUT for p, o in rows)
    split = parse("trace:splitwise", num_requests=100, seed=3)
    assert len(split.lengths) == 100 and split.lengths == parse("trace:splitwise", 100, seed=3).lengths
    assert parse("const:8:2:3").lengths == [(8, 2)] * 3 and len(parse("trace:lmsys:7").lengths) == 7
    for bad in ("const:10", "const:0:5", "trace:nope", "poisson:1", "const:1:2:x"):
        with pytest.raises(ValueError):
            parse(bad)
    # a count of 0 was taken as "the default" (1,000 requests), a negative one divided by zero later
    for bad, n in (("const:8:4:0", None), ("const:8:4:-1", None), ("trace:lmsys:0", None), ("trace:lmsys:-1", None)):
        with pytest.raises(ValueError, match="counts must be positive"):
            parse(bad, n)
    for bad, n, message in (("const:8:4", 0, "--num-requests must be >= 1"), ("trace:lmsys", -2, "--num-requests"),
                            ("trace:splitwise:5:6", None, "expected trace:NAME"),  # (it ran the whole trace)
                            ("trace:splitwise:100000", None, "the trace has 17563 requests, fewer than 100000")):
        with pytest.raises(ValueError, match=message):
            parse(bad, n)


def test_cost_model():
    cfg = preset("llama-3-8b")
    assert cfg.num_params() == pytest.approx(8.03e9, rel=0.01)
    gemms = cost_model.layer_gemms(cfg, 2048)
    assert gemms["qkv"] == (2048, 6144, 4096) and gemms["down"] == (2048, 4096, 14336)
    # the paper's arithmetic: 767 TFLOP/s -> ~47,800 tok/s for Llama-3-8B
    assert cost_model.optimal_throughput(767e12, cfg) == pytest.approx(47_800, rel=0.01)
    moe = preset("mixtral-8x7b")  # P: a token's parameters, its top-2 experts' (12.9 B of 46.7 B)
    assert cost_model.optimal_throughput(767e12, moe) == pytest.approx(767e12 / (2 * moe.active_params()))
    tiny = preset("llama-2-7b", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4, head_dim=16)
    rate = cost_model.gemm_rate(tiny, 32, torch.float32, torch.device("cpu"), reps=3)
    assert rate["rate"] > 0 and set(rate["per_gemm"]) == {"qkv", "o", "gate_up", "down"}


def test_c_is_the_devices_rate(monkeypatch):
    """C is the higher of the model's layer GEMMs' rate and, on a GPU, the reference set's (Llama-3-8B's at 2,048
    rows): a narrow model's slow GEMMs (Qwen3-30B-A3B's read 506 TFLOP/s against 722-759) lowered C and so lifted its
    % of optimal. On the CPU only the model's own are timed."""
    timed = []

    def rate(cfg, tokens, dtype, device, reps=20):
        timed.append((cfg.hidden_size, tokens))
        return {"rate": {2048: 500e12, 4096: 750e12}[cfg.hidden_size]}
    monkeypatch.setattr(cost_model, "gemm_rate", rate)
    narrow, wide = preset("qwen3-30b-a3b"), preset("mixtral-8x7b")
    assert cost_model.device_rate(narrow, 512, torch.bfloat16, torch.device("cuda")) == {
        "rate": 750e12, "model": 500e12, "reference": 750e12}
    assert timed == [(2048, 512), (4096, 2048)]
    assert cost_model.device_rate(narrow, 512, torch.float32, torch.device("cpu")) == {
        "rate": 500e12, "model": 500e12, "reference": None}
    monkeypatch.setattr(cost_model, "gemm_rate", lambda cfg, tokens, *a: {"rate": 800e12 if tokens == 4096 else 1})
    assert cost_model.device_rate(wide, 4096, torch.bfloat16, torch.device("cuda"))["rate"] == 800e12  # (its own)


def test_bench_throughput_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--workload", "const:24:6", "--num-requests", "6", "--warmup-requests", "1",
                 "--workload", "trace:lmsys:3", "--workload", "const:48:2:3", "--output", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    r, t, longer = report["results"]
    assert longer["prefix_cache_hit_rate"] == 0  # its prompts did start with the first workload's: a cache hit
    assert t["workload"] == "trace:lmsys:3" and t["num_requests"] == 3
    assert r["num_requests"] == 6 and r["total_prompt_tokens"] == 144 and r["total_output_tokens"] == 36
    assert r["tokens_per_second"] == pytest.approx(180 / r["elapsed_time"])
    assert r["cached_prompt_tokens"] == 0 and r["computed_tokens_per_second"] == r["tokens_per_second"]
    assert r["percent_of_optimal"] == pytest.approx(100 * r["tokens_per_second"] / report["optimal_tokens_per_second"])
    printed = capsys.readouterr().out
    assert report["device"] == "cpu" and report["kv_blocks"] > 0 and "% of optimal" in printed
    assert report["model"] == "SmolLM2-135M-Instruct.Q4_1" and report["num_layers"] is None  # (what labels a plot)
    assert r["steady_iterations"] == 0 and r["steady_tokens_per_second"] is None  # all 6 fit at once
    assert len(r["gc_collections"]) == 3 and "host GC pauses" in printed
    assert len(report["gemm_tflops_measured"]) == 2 and report["gemm_tflops"] == max(report["gemm_tflops_measured"])
    assert report["gemm_tflops_model_shapes"] == report["gemm_tflops_measured"]  # (on the CPU, the model's own)
    assert report["gemm_tflops_reference"] == [None, None]
    assert (report["mode"], report["pipeline_spec"]) == ("non-overlap", None)
    # a workload run twice in one report is two bars, not one; a folder is no report
    from nanoflow.bench.plots import _run_names
    assert _run_names([{"workload": "a"}, {"workload": "b"}, {"workload": "a"}]) == ["a", "b", "a (2)"]
    assert main(["bench", "plot", str(tmp_path), "-o", str(tmp_path / "p.png")]) == 2
    assert "cannot be read (Is a directory)" in capsys.readouterr().err
    # the GPU-only views are refused on the CPU by name, not skipped silently
    for flag in (["--breakdown"], ["--timeline", str(tmp_path / "t.png")]):
        assert main(["bench", "throughput", "--workload", "const:24:6", "--device", "cpu", *flag]) == 2
        assert "need a GPU and CUDA graphs" in capsys.readouterr().err


def test_gpu_only_views_are_refused_before_the_hf_baseline_runs(monkeypatch, capsys):
    """(The refusal came after the whole HF baseline, minutes of it on a large model.)"""
    from nanoflow.bench import throughput
    monkeypatch.setattr(throughput, "_hf_baseline", lambda *a: pytest.fail("the HF baseline ran before the refusal"))
    assert main(["bench", "throughput", "--workload", "const:24:6", "--device", "cpu", "--baseline", "hf",
                 "--breakdown"]) == 2
    assert "need a GPU and CUDA graphs" in capsys.readouterr().err


def test_peak_running_counts_requests_as_scheduled(tmp_path):
    """One-token outputs end in the step that schedules them: the peak read after the step was 0 (synchronous
    scheduling, the CPU's default); it is the scheduler's, as bench schedule's replay reports it."""
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--workload", "const:16:1:10", "--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["peak_running_requests"] == 10


def test_gc_pauses_counts_the_collections_inside():
    import gc
    from nanoflow.bench.throughput import GcPauses
    with GcPauses() as p:
        gc.collect()
    gc.collect()  # outside: not counted
    assert p.count[2] == 1 and p.ms[2] > 0 and p.max_ms >= p.ms[2]
    assert p not in gc.callbacks


def test_clocks_sample_the_gpu_while_entered(tmp_path):
    """nvidia-smi's answers (here a stand-in that prints them, one a call, and a sample it cannot give) become the
    run's clock and power; the power cap counts by its reason bit. Without the tool, or off CUDA, nothing."""
    import sys
    import time
    from nanoflow.bench.throughput import Clocks
    answers = tmp_path / "answers"
    answers.write_text("1470, 692.07, 0x0000000000000004\n1980, 600.5, 0x0000000000000000\n[N/A], [N/A], [N/A]\n"
                       "1395, 699.9, 0x0000000000000005\n")
    fake = (sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); lines = p.read_text()."
            "splitlines(); print(lines[0] if lines else ''); p.write_text(''.join(l + chr(10) for l in lines[1:]))",
            str(answers))
    with Clocks("GPU-0", command=fake, period=0.01) as c:
        deadline = time.time() + 60
        while len(c.samples) < 3 and time.time() < deadline:  # (the file is rewritten: it can read empty mid-write)
            time.sleep(0.01)
    assert not c._thread.is_alive()
    s = c.summary()
    assert s["sm_clock_mhz_median"] == 1470 and s["sm_clock_mhz_min"] == 1395
    assert s["power_w_median"] == pytest.approx(692.07) and s["power_capped_share"] == pytest.approx(2 / 3)
    with Clocks(None) as off, Clocks("GPU-0", command=("no-such-tool",)) as missing:
        pass
    assert off.summary() == {} and missing.summary() == {}


def test_bench_steady_state(tmp_path):
    """With more requests than run at once, the steady state (some request done, others still waiting) is measured
    apart from the fill and the drain: its batches are fuller than the whole run's."""
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--workload", "const:24:12", "--num-requests", "12", "--max-num-seqs", "3",
                 "--max-num-batched-tokens", "32", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["results"][0]
    assert 0 < r["steady_iterations"] < r["iterations"]
    assert r["mean_tokens_per_iteration"] < r["steady_mean_tokens_per_iteration"] <= 32
    assert r["steady_percent_of_optimal"] == pytest.approx(
        100 * r["steady_tokens_per_second"] / report["optimal_tokens_per_second"])
    png = tmp_path / "bars.png"
    assert main(["bench", "plot", str(out), str(out), "-o", str(png)]) == 0
    from nanoflow.bench.plots import report_labels  # two reports alike are told apart by their files' names
    same, other = {"model": None, "commit": "abc", "device": "cpu"}, {"model": "m", "commit": "abc", "device": "cpu"}
    assert report_labels([same, same], ["a/x.json", "b/y.json"]) == ["default model abc cpu (x.json)",
                                                                     "default model abc cpu (y.json)"]
    assert report_labels([same, other], ["x", "y"]) == ["default model abc cpu", "m abc cpu"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_iteration_clock_phases_and_idle(monkeypatch):
    """The clock's arithmetic, with stand-in events at given GPU times (ms): busy and idle time, the phases
    averaged over the steady iterations only, and each stage's GPU time per token."""
    from nanoflow.executor import profiling

    class Event:
        def __init__(self, t):
            self.t = t

        def elapsed_time(self, later):
            return later.t - self.t

    times = iter([0, 5, 6, 7,  # an iteration before the steady state: forward 5, logits 1, sampling 1
                  9, 19, 21, 24,  # steady (after a 2 ms gap): 10, 2, 3
                  24, 36, 38, 39])  # steady, no gap: 12, 2, 1
    monkeypatch.setattr(profiling, "_event", lambda: Event(next(times)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    clock = profiling.IterationClock()
    for stage in ("fill", "steady", "steady"):
        clock.stage = stage
        clock.start(100 if stage == "fill" else 200)
        clock.mark()
        clock.mark()
        clock.end()
    s = clock.summary()
    assert s["iterations"] == 3 and s["gpu_busy_ms"] == 7 + 15 + 15 and s["gpu_idle_ms"] == 2
    assert s["phase_ms"] == {"forward": 11, "logits": 2, "sampling": 2} and s["phase_iterations"] == 2
    assert s["stages"] == {"fill": {"iterations": 1, "tokens": 100, "gpu_ms": 7, "tokens_per_gpu_second": 100 / 7e-3},
                           "steady": {"iterations": 2, "tokens": 400, "gpu_ms": 30,
                                      "tokens_per_gpu_second": 400 / 30e-3}}


def test_bench_schedule_replays_the_engines_iterations(tmp_path, capsys):
    """bench schedule (the scheduler alone) takes as many iterations as the engine does on the same lengths,
    budget, KV blocks and policy (the engine scheduling asynchronously, as on a GPU)."""
    engine, replayed = tmp_path / "engine.json", tmp_path / "replay.json"
    common = ["--workload", "const:40:20:30", "--max-num-batched-tokens", "64", "--num-kv-blocks", "60",
              "--admission", "predicted", "--schedule-policy", "lof"]
    assert main(["bench", "throughput", *common, "--warmup-requests", "1", "--async-scheduling",
                 "--output", str(engine)]) == 0
    png = tmp_path / "s.png"
    assert main(["bench", "schedule", *common, "fcfs", "--output", str(replayed), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    ran = json.loads(engine.read_text())["results"][0]
    lof, fcfs = json.loads(replayed.read_text())["results"]
    assert lof["schedule_policy"] == "lof" and lof["iterations"] == ran["iterations"] > 30
    assert lof["peak_running"] == ran["peak_running_requests"] > 1
    assert lof["preemptions"] == ran["preemptions"] == 0
    assert lof["tokens"] == fcfs["tokens"] == 30 * (40 + 19)  # every prompt token, and each output but the last
    # the fewest iterations any schedule could take: here what the sequences hold over the 960 tokens of cache,
    # 30 x (20 x 40 + 19 x 20 / 2) = 29,700 token-iterations (over the budget, their tokens need 28; the longest, 20)
    assert lof["lower_bound"] == fcfs["lower_bound"] == 31 <= lof["iterations"]
    # benchmarks/iteration_cost.py splits the replay into the run's stages as the bench does (steady: some request
    # has finished and some wait), and into prefill and decode tokens
    spec = importlib.util.spec_from_file_location(
        "iteration_cost", Path(__file__).parents[1] / "benchmarks" / "iteration_cost.py")
    iteration_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(iteration_cost)
    run = json.loads(engine.read_text())
    run["results"][0]["stages"] = {"steady": {"iterations": ran["steady_iterations"]}}
    sums = iteration_cost.stage_sums(run, 2048)
    assert sums["steady"][0] == ran["steady_iterations"] > 10 and sums["fill"][0] > 0 and sums["drain"][0] > 0
    assert sum(v[0] for v in sums.values()) == ran["iterations"]
    assert sum(v[1] for v in sums.values()) == 30 * 40 and sum(v[2] for v in sums.values()) == 30 * 19
    assert "iterations" in capsys.readouterr().out
    # bench plot draws throughput reports: a replay is refused, and named as one
    assert main(["bench", "plot", str(replayed), "-o", str(tmp_path / "p.png")]) == 2
    assert "not a `bench throughput` report" in (err := capsys.readouterr().err) and "`bench schedule` replay" in err
    assert main(["bench", "schedule", "--workload", "const:2000:5:2", "--num-kv-blocks", "60"]) == 2
    assert "2000 tokens" in capsys.readouterr().err
