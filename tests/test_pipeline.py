"""Pipeline specs, their dependency rules, and nano-batched execution == the plain forward (CPU)."""
import dataclasses
import json
import re

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.models.llama import LAYER_OPS
from nanoflow.pipeline.graph import dependencies
from nanoflow.pipeline.spec import NanoOp, PipelineSpec, Unit, load_spec, non_overlap

HAND = "llama-3-8b-h100-hand"


def four_way(tokens=64):
    """Every op in four uneven nano-batches, attention on a memory unit, issued batch by batch."""
    cuts = [0, 8, 24, 40, tokens]
    ops = []
    for i in range(4):
        for op in LAYER_OPS:
            ops.append(NanoOp(op, cuts[i], cuts[i + 1], "mem" if op.endswith("attn") else "gemm"))
    return PipelineSpec("four", tokens, [Unit("gemm", "compute", 100), Unit("mem", "memory", 32)], ops).validate()


def test_shipped_spec_round_trips(tmp_path):
    spec = load_spec(HAND)
    assert spec.tokens == 2048 and {u.kind for u in spec.units} == {"compute", "memory"}
    path = tmp_path / "s.json"
    spec.save(str(path))
    assert PipelineSpec.load(str(path)) == spec == load_spec(str(path))
    assert json.loads(path.read_text())["nano_ops"][0] == {"op": "attn_norm", "start": 0, "end": 1024,
                                                           "unit": "compute"}


def test_scaling_keeps_coverage():
    spec = four_way(2048)
    for rows in (8, 13, 100, 777, 2048):
        for op in LAYER_OPS:
            ranges = sorted((n.start, n.end) for n in spec.scaled(rows) if n.op == op)
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(x % 8 == 0 for r in ranges for x in r if x != rows)


def test_a_spec_runs_its_own_boundaries_at_its_token_count():
    """A tuned spec cuts at the decode/prefill boundary (682 of 2,048 rows by default), which is what it runs at
    its own size (it ran 680, its decode attention then also over the prefill nano-batch); other sizes round."""
    spec = PipelineSpec("cut", 2048, [Unit("gemm", "compute", 0)],
                        [NanoOp(op, a, b, "gemm") for a, b in ((0, 682), (682, 2048)) for op in LAYER_OPS]).validate()
    assert spec.scaled(2048) == spec.nano_ops
    assert {(n.start, n.end) for n in spec.scaled(1024)} == {(0, 344), (344, 1024)}


def test_dependencies():
    spec = four_way()
    layer = spec.nano_ops
    attn = next(n for n in layer if n.op == "prefill_attn" and n.start == 24)
    assert {(d.op, d.start) for d in dependencies(attn, layer)} == {("rope_kv", 0), ("rope_kv", 8), ("rope_kv", 24)}
    o = next(n for n in layer if n.op == "o_proj" and n.start == 8)
    assert {(d.op, d.start) for d in dependencies(o, layer)} == {("decode_attn", 8), ("prefill_attn", 8)}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.nano_ops.pop(), "must cover rows"),
    (lambda s: setattr(s.nano_ops[0], "end", 9), "must cover rows"),
    (lambda s: setattr(s.nano_ops[0], "op", "softmax"), "unknown op"),
    (lambda s: setattr(s.nano_ops[0], "unit", "tpu"), "unknown unit"),
    (lambda s: setattr(s.units[0], "kind", "fast"), "kind"),
    (lambda s: s.nano_ops.insert(0, s.nano_ops.pop(5)), "issued before its input"),
    # a stray op of the other kind of layer is named (the valid ops were: "unknown op 'gate_up'")
    (lambda s: s.nano_ops.append(NanoOp("router", 0, 32, s.units[0].name)),
     r"has a dense MLP's ops \['gate_up', 'act', 'down'\] and a mixture of experts' \['router'\]"),
    (lambda s: s.nano_ops.append(NanoOp("down_allreduce", 0, 32, s.units[0].name)),
     r"places \['down_allreduce'\] but no o_allreduce or o_allgather"),
])
def test_invalid_specs_are_rejected(change, message):
    spec = four_way()
    bad = dataclasses.replace(spec, units=[dataclasses.replace(u) for u in spec.units],
                              nano_ops=[dataclasses.replace(n) for n in spec.nano_ops])
    change(bad)
    with pytest.raises(ValueError, match=message):
        bad.validate()


def test_malformed_spec_files(tmp_path):
    with pytest.raises(ValueError, match="malformed pipeline spec"):
        PipelineSpec.from_json('{"name": "x"}')
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped spec"):
        load_spec("no-such-spec")


def _edited(change):
    d = json.loads(four_way().to_json())
    change(d)
    return json.dumps(d)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(tokens="64"), "tokens must be an integer, got '64'"),
    (lambda d: d.update(tokens=64.5), "tokens must be an integer, got 64.5"),
    (lambda d: d.update(tokens=True), "tokens must be an integer, got True"),
    (lambda d: d.update(tokens=0), "tokens must be positive, got 0"),
    (lambda d: d.update(tokens=-64), "tokens must be positive, got -64"),
    (lambda d: d["nano_ops"][0].update(start="0"), "nano_ops[0]: start must be an integer, got '0'"),
    (lambda d: d["nano_ops"][0].update(end=8.5), "nano_ops[0]: end must be an integer, got 8.5"),
    (lambda d: d["units"][1].update(sms="32"), "units[1]: sms must be an integer, got '32'"),
    (lambda d: d["units"][0].update(name=None), "units[0]: name must be a string, got None"),
    (lambda d: d.update(nano_op=d.pop("nano_ops")), "unknown field 'nano_op'"),
    (lambda d: d.update(units={"gemm": "compute"}), "units must be a list, got"),
    (lambda d: d["nano_ops"].__setitem__(0, ["attn_norm", 0, 8, "gemm"]), "nano_ops[0] must be a JSON object"),
    (lambda d: d["units"][0].update(knd=d["units"][0].pop("kind")), "units[0]: unknown field 'knd'"),
    (lambda d: d["nano_ops"][0].pop("unit"), "nano_ops[0]: missing field 'unit'"),
])
def test_hand_edited_spec_fields_are_named(change, message):
    """Each wrong field named with its place: strings for numbers failed as "'<' not supported between instances of
    'int' and 'str'", fractional rows and a float or boolean token count were taken, a typo in a top-level key was
    "malformed pipeline spec: 'nano_ops'", zero tokens a coverage error of rows [0, 0)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        PipelineSpec.from_json(_edited(change))


def test_spec_files_that_cannot_be_read(tmp_path, llama_dir):
    """A directory raised IsADirectoryError (a traceback from the CLI); the errors of a file name it."""
    with pytest.raises(ValueError, match=f"cannot read pipeline spec {re.escape(str(tmp_path))}: Is a directory"):
        load_spec(str(tmp_path))
    for text, message in (("", "Expecting value"), ("[]", "must be a JSON object")):
        (tmp_path / "s.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"malformed pipeline spec {tmp_path / 's.json'}: ") +
                           f".*{message}"):
            LLM(llama_dir, mode="nanobatch-only", pipeline_spec=str(tmp_path / "s.json"))


PROMPTS = [[5, 17, 923, 4410, 88, 2011, 7, 301, 12, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
           [1000, 2000, 3000], [77] * 37, list(range(100, 131)), [31337, 2, 3]]


@pytest.mark.parametrize("budget", [16, 48, 96])  # decode-only, mixed and prefill-only iterations all occur
@pytest.mark.parametrize("spec_name, graph", [("four", False), (HAND, False), ("four", True)])
def test_nanobatched_forward_equals_plain(llama_dir, tmp_path, budget, spec_name, graph):
    """The nano-op graph run sequentially (nanobatch-only) gives the plain forward's tokens and logprobs,
    also through the CUDA-graph path's padded buckets (run eagerly on the CPU)."""
    path = tmp_path / "spec.json"
    (four_way() if spec_name == "four" else load_spec(HAND)).save(str(path))
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    plain = LLM(llama_dir, max_num_batched_tokens=budget).generate(PROMPTS, p, use_tqdm=False)
    nano = LLM(llama_dir, max_num_batched_tokens=budget, mode="nanobatch-only", pipeline_spec=str(path),
               cuda_graph=graph).generate(PROMPTS, p, use_tqdm=False)
    for a, b in zip(nano, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (t, lp), = x.items()
            assert lp.logprob == pytest.approx(y[t].logprob, abs=1e-4)


def test_non_overlap_spec_is_the_plain_forward():
    spec = non_overlap(512)
    assert [n.op for n in spec.nano_ops] == list(LAYER_OPS) and all((n.start, n.end) == (0, 512)
                                                                    for n in spec.nano_ops)


def _batch_and_plain(llama_dir, budget):
    """A mixed batch from a real engine (decode rows and chunked prefills), and its plain-forward output."""
    from nanoflow.engine.llm_engine import LLMEngine
    eng = LLMEngine(llama_dir, max_num_batched_tokens=budget, async_scheduling=False)
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.step()  # into a state with decodes and partial prefills
    out = eng.scheduler.schedule()
    batch = eng.runner.prepare(out)[0].to(eng.device)  # (prepared on the host)
    assert out.num_decode > 0 and len(out.chunks) > out.num_decode
    model = eng.runner.model
    ws = eng.runner.ws.rows(batch.num_tokens)
    kv = model.kv_cache.clone()
    model.forward_layers(batch, ws)
    return eng, model, batch, ws.residual.clone() + ws.hidden, kv


@pytest.mark.parametrize("spec_name", ["four", HAND])
def test_plan_is_correct_in_any_order_the_gpu_may_pick(llama_dir, spec_name):
    from nanoflow.pipeline.plan import plan, simulate
    eng, model, batch, expect, kv = _batch_and_plain(llama_dir, 40)
    spec = four_way() if spec_name == "four" else load_spec(HAND)
    launches = plan(spec.scaled(batch.num_tokens), model.cfg.num_layers, spec.units[0].name)
    assert any(l.waits for l in launches)  # units really do wait on each other
    for seed in range(6):
        model.kv_cache.copy_(kv)
        ws = eng.runner.ws.rows(batch.num_tokens)
        ws.residual.fill_(float("nan"))
        simulate(model, launches, ws, batch, seed)
        assert (ws.residual + ws.hidden).allclose(expect, atol=1e-5, rtol=1e-5)


def test_simulation_catches_a_missing_wait(llama_dir):
    """Without its waits the same plan goes wrong in some order: the simulation has teeth."""
    from nanoflow.pipeline.plan import plan, simulate
    eng, model, batch, expect, kv = _batch_and_plain(llama_dir, 40)
    spec = four_way()
    launches = plan(spec.scaled(batch.num_tokens), model.cfg.num_layers, "gemm")
    for launch in launches:
        launch.waits = []
    wrong = 0
    for seed in range(6):
        model.kv_cache.copy_(kv)
        ws = eng.runner.ws.rows(batch.num_tokens)
        simulate(model, launches, ws, batch, seed)
        wrong += not (ws.residual + ws.hidden).allclose(expect, atol=1e-5, rtol=1e-5)
    assert wrong > 0
