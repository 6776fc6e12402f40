"""Turns a scheduled iteration into tensors, runs the model, samples.

The runner owns the model, the KV cache and the activation workspace. It knows nothing of text:
it returns token ids and logprob numbers; the engine turns them into outputs.

With tensor parallelism, every rank has a runner over its shard. Rank 0's prepares each iteration, broadcasts it
(a `Step`) to the others, and samples; the others only run steps (`run_step`, nanoflow/distributed/worker.py).
"""
from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field

import torch

from nanoflow.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig
from nanoflow.distributed.parallel_state import agree_min, broadcast_object, broadcast_tensor
from nanoflow.engine.scheduler import Chunk, SchedulerOutput
from nanoflow.engine.sequence import Sequence
from nanoflow.engine.structured_output import mask_logits
from nanoflow.executor.cuda_graphs import GraphRunner
from nanoflow.executor.kv_offload import KVOffload
from nanoflow.executor.profiling import IterationClock
from nanoflow.layers.sampler import LogprobRows, SamplingMetadata, logprob_rows, sample
from nanoflow.models.batch import ForwardBatch
from nanoflow.models.llama import LlamaModel, Workspace, layer_ops
from nanoflow.pipeline.executor import Pipeline, run_sequential
from nanoflow.pipeline.cache import gpu_name, resolve_pipeline_spec
from nanoflow.pipeline.spec import PipelineSpec

CPU_BATCH_TOKENS = 512
CPU_KV_CACHE_GB = 1.0  # the KV cache's size on the CPU when neither num_kv_blocks nor kv_cache_gb is given
GPU_BATCH_TOKENS = 2048


def _host_free_bytes() -> int | None:
    """The host's available memory (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def batch_budget(max_num_batched_tokens: int | None, device: torch.device) -> int:
    """The most tokens an iteration runs."""
    return max_num_batched_tokens or (GPU_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS)


def pipeline_spec(config: EngineConfig, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                  tp_size: int) -> PipelineSpec:
    """The spec that cuts and places a nano-batching mode's layers, checked against the layer's ops (cfg: one
    rank's shape)."""
    spec = resolve_pipeline_spec(config.pipeline_spec, gpu_name(device), cfg, dtype,
                                 batch_budget(config.max_num_batched_tokens, device), tp_size
                                 ).for_tensor_parallel(tp_size)
    if spec.ops != (ops := layer_ops(tp_size, cfg.is_moe)):
        raise ValueError(f"pipeline spec {spec.name!r} has the ops {spec.ops}; this model's layer has {ops}")
    return spec


def settle_gc() -> None:
    """Once a process's runner is built, for the rest of its life: freeze what exists (the model, the runner, the
    graphs: full collections need not walk them), and collect the young generation every 50,000 allocations, not
    700, so that an iteration's short-lived objects die by refcount before any collection walks them. With the
    defaults, #9's bench paused the host 9.8 s in a 129 s run, 54 full collections of ~70 ms each (BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


@dataclass(slots=True)
class ModelOutput:
    token_ids: list[int]  # one per sampling chunk, in chunk order
    logprobs: LogprobRows | None  # for the sampled tokens, when any sequence asked
    prompt_logprobs: dict[int, LogprobRows] = field(default_factory=dict)  # chunk index -> its prompt rows


@dataclass(slots=True)
class _Plan:
    """Where each chunk's logits rows are, and which input rows take a token still on the GPU."""
    sample_rows: list[int]  # logits row of each sampling chunk
    sample_chunks: list[Chunk]
    prompt_rows: dict[int, tuple[int, int, int]]  # chunk index -> (first logits row, rows, first position)
    feed_rows: list[int] = field(default_factory=list)  # input rows whose token the last launch sampled
    feed_src: list[int] = field(default_factory=list)  # ... and its index in that launch's tokens


@dataclass(slots=True)
class Step:
    """What every tensor-parallel rank needs to run an iteration's forward: the host batch, the input rows whose
    token rank 0 sampled in the last launch (it sends them on the device), and the iteration's KV copies."""
    batch: ForwardBatch
    feed_rows: list[int]
    kv_saves: list[tuple[int, int]]
    kv_loads: list[tuple[int, int]]
    kv_fence: bool
    race: list[float] | None = None  # the sampled rows' temperatures, when the ranks race (_race)


@dataclass(slots=True)
class Launch:
    """An iteration in flight. Its results are copied to host memory without blocking; `done` marks them."""
    tokens: torch.Tensor
    logprobs: LogprobRows | None
    prompt_logprobs: dict[int, LogprobRows]
    done: torch.cuda.Event | None


class ModelRunner:
    def __init__(self, model: LlamaModel, config: EngineConfig, eos_token_ids: set[int], max_model_len: int):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.max_model_len = max_model_len
        self.device, self.dtype = model.device, model.dtype
        self.kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or self.dtype
        self.eos_token_ids = sorted(eos_token_ids)
        on_gpu = self.device.type == "cuda"
        self.max_num_tokens = batch_budget(config.max_num_batched_tokens, self.device)
        self.block_size = config.block_size
        self.tp = model.tp
        if config.mode != "non-overlap":
            self.spec = pipeline_spec(config, self.cfg, self.device, self.dtype, self.tp.size)
            if self.spec.gathers:  # (before the KV cache takes the memory)
                model.prepare_o_allgather()
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        if self.tp.size > 1:  # the scheduler's block ids index every rank's cache
            self.num_blocks = agree_min(self.tp, self.num_blocks)
        if self.num_blocks <= 0:
            raise ValueError("the KV cache holds no block of this model; raise num_kv_blocks or kv_cache_gb")
        c = self.cfg
        # one spare block past the last: padding rows write their KV there
        model.kv_cache = self._allocate(
            "the KV cache", (self.num_blocks + 1) * self._block_bytes(), "num_kv_blocks or kv_cache_gb",
            lambda: torch.zeros(c.num_layers, 2, self.num_blocks + 1, self.block_size, c.num_kv_heads, c.head_dim,
                                dtype=self.kv_dtype, device=self.device))
        self.pad_slot = self.num_blocks * self.block_size
        self.num_host_blocks = int(config.kv_offload_gb * 2**30) // self._block_bytes()
        self.offload = self._allocate(
            "the KV cache's host tier", self.num_host_blocks * self._block_bytes(), "kv_offload_gb",
            lambda: KVOffload(model.kv_cache, self.num_host_blocks), host=True) if self.num_host_blocks else None
        self.ws = self._allocate(
            "an iteration's activations", Workspace.bytes_for(c, self.max_num_tokens, self.dtype, self.tp.size,
                                                              self.model.k),
            "max_num_batched_tokens", lambda: Workspace.allocate(c, self.max_num_tokens, self.dtype, self.device,
                                                                 self.tp.size))
        torch.manual_seed(config.seed)
        # with tensor parallelism each rank draws the race's noise for its vocabulary slice: streams of their own
        self.race_generator = torch.Generator(self.device)
        self.race_generator.manual_seed((config.seed + 1 + self.tp.rank) % 2**64)  # (within its range)
        self.last_tokens = torch.empty(0, dtype=torch.long, device=self.device)  # sampled by the last launch
        self.last_index: dict[int, int] = {}  # seq id -> its row in last_tokens
        self.clock: IterationClock | None = None  # set to measure the GPU's idle time and each iteration's phases
        self.keep_next_batch = False  # set to keep the next iteration's batch (self.kept_batch), for profiling
        self.kept_batch: ForwardBatch | None = None
        self.forward = model.forward_layers  # (batch, ws): all layers, however they are cut and placed
        if config.mode == "nanobatch-only":
            self.forward = functools.partial(run_sequential, model, self.spec)
        elif config.mode == "pipeline":
            if not on_gpu:
                raise ValueError("mode 'pipeline' runs on SM-partitioned CUDA streams; on the CPU use "
                                 "'nanobatch-only' (the same nano-ops in order)")
            self.forward = Pipeline(model, self.spec)
        self.graphs: GraphRunner | None = None
        if on_gpu and config.cuda_graph and not model.capturable:
            raise ValueError(f"CUDA graphs of a mixture-of-experts model need the Triton grouped GEMMs, which take "
                             f"bfloat16 or float16, not {self.dtype}; use --enforce-eager or --dtype bfloat16")
        if config.cuda_graph if config.cuda_graph is not None else on_gpu and model.capturable:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = GraphRunner(self.forward, self.ws, self.max_num_tokens, config.max_num_seqs, max_blocks,
                                      self.pad_slot, capture=on_gpu)
            if on_gpu:
                self.graphs.capture_all()

    def _allocate(self, what: str, nbytes: int, knob: str, make, host: bool = False):
        """make(), or ValueError naming what did not fit and the option that sizes it. In host memory (the CPU
        device, the host tier) a size past what the host has free is refused before it is taken: the kernel's OOM
        killer would end the process rather than the allocation fail."""
        on_host = host or self.device.type == "cpu"
        free = _host_free_bytes() if on_host else None
        where = "the host" if on_host else "the GPU"
        if free is not None and nbytes > free:
            raise ValueError(f"{what}: {nbytes / 2**30:.2f} GiB, more than {where} has free "
                             f"({free / 2**30:.2f} GiB); lower {knob}")
        try:
            return make()
        except RuntimeError as e:  # (torch.OutOfMemoryError on a GPU; the CPU allocator's own error)
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            raise ValueError(f"{what} ({nbytes / 2**30:.2f} GiB) does not fit in {where}'s memory; lower "
                             f"{knob}") from None

    def _block_bytes(self) -> int:
        return self.cfg.kv_bytes_per_token(self.kv_dtype) * self.block_size

    def _blocks_from_memory(self) -> int:
        per_block, gb = self._block_bytes(), self.config.kv_cache_gb
        if self.device.type != "cuda":
            return int((gb or CPU_KV_CACHE_GB) * 2**30) // per_block
        torch.cuda.empty_cache()  # what loading freed (init_dummy's whole tensors) would otherwise count as used
        free, total = torch.cuda.mem_get_info(self.device)
        c = self.cfg
        # activations of one full iteration, plus logits rows in float32 (with headroom for sampling)
        act = Workspace.bytes_for(c, self.max_num_tokens, self.dtype, self.tp.size, self.model.k)
        logits = 4 * c.vocab_size * max(self.max_num_tokens, self.config.max_num_seqs) * 3
        if gb is not None:
            if gb * 2**30 + act + logits > free:
                raise ValueError(f"kv_cache_gb={gb} does not fit: {free / 2**30:.2f} GiB of the GPU are free, and "
                                 f"an iteration's activations and logits take {(act + logits) / 2**30:.2f} GiB")
            return int(gb * 2**30) // per_block
        usable = total * self.config.gpu_memory_utilization - (total - free) - act - logits
        if usable < per_block:
            raise ValueError(
                f"not enough memory for the KV cache: gpu_memory_utilization={self.config.gpu_memory_utilization} "
                f"allows {total * self.config.gpu_memory_utilization / 2**30:.2f} GiB of {total / 2**30:.2f}, "
                f"{(total - free) / 2**30:.2f} GiB are in use (this model's weights, other processes), and an "
                f"iteration's activations and logits take {(act + logits) / 2**30:.2f} GiB; raise "
                f"gpu_memory_utilization, lower max_num_batched_tokens, or free the GPU")
        return int(usable // per_block)

    # -- one iteration ---------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> Launch:
        """Enqueue the iteration on the GPU and return at once (on the CPU it simply runs)."""
        batch, plan = self.prepare(out)
        if self.keep_next_batch:
            self.kept_batch, self.keep_next_batch = batch, False
        step = Step(batch, plan.feed_rows, out.kv_saves, out.kv_loads, out.kv_fence, self._race(plan))
        if self.tp.size > 1:
            broadcast_object(self.tp, step)
        self.clock and self.clock.start(batch.num_tokens)  # after the host's preparation: a GPU that waits is idle
        fed = self.last_tokens[self._device(plan.feed_src)] if plan.feed_rows else None
        result = self.run_step(step, fed)
        launch = self._sample(out, result, plan) if step.race is None else self._launch(result, None, {}, plan)
        self.clock and self.clock.end()
        return launch

    def _race(self, plan: _Plan) -> list[float] | None:
        """With tensor parallelism, the sampled rows' temperatures when the ranks can race over their vocabulary
        slices instead of gathering the logits (LlamaModel.race_tokens): no prompt logprobs, and every sampled
        row plain (SamplingParams.plain) with no min_tokens ban."""
        if self.tp.size == 1 or plan.prompt_rows or not plan.sample_chunks:
            return None
        seqs = [c.seq for c in plan.sample_chunks]
        if not all(s.params.plain and s.num_generated >= s.params.min_tokens for s in seqs):
            return None
        return [s.params.temperature for s in seqs]

    @torch.inference_mode()
    def run_step(self, step: Step, fed: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward and the logits, or with step.race the sampled tokens (on rank 0; None on the other ranks).
        fed: on rank 0, the tokens of the step's feed rows (on the device); the other ranks receive them."""
        if self.offload is not None:
            self.offload.issue(step.kv_saves, step.kv_loads, step.kv_fence)
        batch, feed = step.batch, None
        if step.feed_rows:
            if self.tp.size > 1:
                fed = broadcast_tensor(fed if fed is not None else torch.empty(
                    len(step.feed_rows), dtype=torch.long, device=self.device))
            feed = (self._device(step.feed_rows), fed)
        if self.graphs is not None:  # the graph's buffers are filled from the host batch
            ws = self.graphs.run(batch, feed)
            rows = batch.logits_rows.to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
            if feed is not None:
                batch.input_ids[feed[0]] = feed[1]
            ws = self.ws.rows(batch.num_tokens)
            self.forward(batch, ws)
            rows = batch.logits_rows
        self.clock and self.clock.mark()
        if step.race is None:
            result = self.model.compute_logits(ws, rows)
        else:
            result = self.model.race_tokens(ws, rows, self._device(step.race, torch.float32), self.race_generator)
        self.clock and self.clock.mark()
        return result

    def collect(self, launch: Launch) -> ModelOutput:
        """Wait for a launched iteration and bring its results to the host."""
        if launch.done is not None:
            launch.done.synchronize()
        return ModelOutput(launch.tokens.tolist(), launch.logprobs.tolist() if launch.logprobs else None,
                           {i: r.tolist() for i, r in launch.prompt_logprobs.items()})

    def _host(self, x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        t = torch.tensor(x, dtype=dtype)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _device(self, x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A list to the device without blocking: pinned host memory, asynchronous copy. (Indexing a GPU
        tensor with a Python list would copy from pageable memory and wait for the whole stream.)"""
        return self._host(x, dtype).to(self.device, non_blocking=True)

    def prepare(self, out: SchedulerOutput) -> tuple[ForwardBatch, _Plan]:
        ids, pos, slots, qs, lens, tables, rows = [], [], [], [0], [], [], []
        plan = _Plan([], [], {})
        bs = self.block_size
        for i, c in enumerate(out.chunks):
            seq = c.seq
            base = len(ids)
            span = range(c.start, c.start + c.length)
            ids += seq.token_ids[c.start: c.start + c.length]
            if len(ids) < base + c.length:  # the last token is still on the GPU: fed from the last launch
                plan.feed_rows.append(len(ids))
                plan.feed_src.append(self.last_index[seq.seq_id])
                ids.append(0)
            pos += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            qs.append(base + c.length)
            lens.append(c.start + c.length)
            tables.append(seq.block_table)
            first, n_prompt = self._prompt_logprob_rows(c)
            if n_prompt:
                plan.prompt_rows[i] = (len(rows), n_prompt, first)
                rows += range(base + first - c.start, base + first - c.start + n_prompt)
            if c.samples:  # its last row is never a prompt row: that one predicts a generated token
                plan.sample_rows.append(len(rows))
                rows.append(base + c.length - 1)
                plan.sample_chunks.append(c)
        host = self._host
        return ForwardBatch(host(ids), host(pos), host(slots), qs, lens, tables, out.num_decode, host(rows)), plan

    @staticmethod
    def _prompt_logprob_rows(c: Chunk) -> tuple[int, int]:
        """(first position, count) of this chunk's rows whose next token is a prompt token whose logprobs are
        wanted and not computed yet (by an earlier chunk, or before a preemption); they count as planned."""
        req = c.seq.request
        if req.prompt_logprobs is None or c.seq.index != 0:
            return 0, 0  # not asked, or a sibling computes them
        first = max(req.prompt_logprobs_planned - 1, c.start)  # the row at position p predicts token p + 1
        n = max(min(c.start + c.length, c.seq.num_prompt_tokens - 1) - first, 0)
        req.prompt_logprobs_planned += n
        return first, n

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor, plan: _Plan) -> Launch:
        seqs = [c.seq for c in plan.sample_chunks]
        tokens = torch.empty(0, dtype=torch.long, device=self.device)
        logprobs = None
        if seqs:
            every_row = plan.sample_rows == list(range(len(logits)))  # no prompt logprobs: skip the copy
            sample_logits = logits if every_row else logits.index_select(0, self._device(plan.sample_rows))
            if constrained := [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None and not s.reasoning]:
                # on the logits, not the bias: the logprobs are of what the grammar allows, as vLLM's; a token that
                # may open the reasoning instead (Sequence.opening) keeps its logit
                if opening := [(i, s.opening) for i, s in enumerate(seqs) if s.opening is not None]:
                    rows, ids = (self._device(list(x)) for x in zip(*opening))
                    kept = sample_logits[rows, ids]
                mask_logits(sample_logits, *map(list, zip(*constrained)))
                if opening:
                    sample_logits[rows, ids] = kept
            tokens = sample(sample_logits, self.sampling_metadata(seqs))
            k = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=-1)
            if k >= 0:
                logprobs = logprob_rows(sample_logits.log_softmax(-1), tokens, k)
        prompt = {}
        for i, (row, n, pos) in plan.prompt_rows.items():
            c = out.chunks[i]
            targets = self._device(c.seq.token_ids[pos + 1: pos + 1 + n])
            prompt[i] = logprob_rows(logits[row: row + n].log_softmax(-1), targets, c.seq.params.prompt_logprobs)
        return self._launch(tokens, logprobs, prompt, plan)

    def _launch(self, tokens: torch.Tensor, logprobs: LogprobRows | None, prompt: dict[int, LogprobRows],
                plan: _Plan) -> Launch:
        self.last_tokens = tokens
        self.last_index = {c.seq.seq_id: i for i, c in enumerate(plan.sample_chunks)}
        if self.device.type != "cuda":
            return Launch(tokens, logprobs, prompt, None)
        # non-blocking copies into pinned memory: the CPU does not wait for this iteration here
        launch = Launch(tokens.to("cpu", non_blocking=True), logprobs and logprobs.to("cpu"),
                        {i: r.to("cpu") for i, r in prompt.items()}, torch.cuda.Event())
        launch.done.record()
        return launch

    def sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        dev = self.device
        params = [s.params for s in seqs]

        def col(name, dtype=torch.float32):
            return self._device([getattr(p, name) for p in params], dtype)
        vocab = self.cfg.vocab_size
        top_k = self._device([min(p.top_k, vocab) for p in params], torch.long)  # (any int: past the vocab is off)
        md = SamplingMetadata(col("temperature"), top_k, col("top_p"), col("min_p"),
                              [self._generator(s) for s in seqs], all_greedy=all(p.temperature == 0 for p in params),
                              any_greedy=any(p.temperature == 0 for p in params),
                              use_min_p=any(p.min_p > 0 for p in params),
                              use_top_k_p=any(p.top_k > 0 or p.top_p < 1 for p in params))
        if any(p.penalized for p in params):
            md.repetition_penalty = col("repetition_penalty")
            md.presence_penalty = col("presence_penalty")
            md.frequency_penalty = col("frequency_penalty")
            md.prompt_mask = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=dev)
            md.output_counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=dev)
            rows, prompt_ids, out_rows, out_ids = [], [], [], []
            for i, s in enumerate(seqs):
                rows += [i] * s.num_prompt_tokens
                prompt_ids += s.token_ids[: s.num_prompt_tokens]
                out_rows += [i] * s.num_output_tokens
                out_ids += s.output_token_ids
            md.prompt_mask[self._device(rows), self._device(prompt_ids)] = True
            md.output_counts.index_put_((self._device(out_rows), self._device(out_ids)),
                                        torch.ones(len(out_ids), device=dev), accumulate=True)
            # tokens sampled by the last launch and not yet seen by the host count too
            inflight = [(i, self.last_index[s.seq_id]) for i, s in enumerate(seqs) if s.num_inflight]
            if inflight:
                r, src = zip(*inflight)
                md.output_counts.index_put_((self._device(list(r)), self.last_tokens[self._device(list(src))]),
                                            torch.ones(len(r), device=dev), accumulate=True)
        if any(p.biased for p in params):
            md.logit_bias = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=dev)
            for i, p in enumerate(params):
                if p.allowed_token_ids is not None:
                    md.logit_bias[i] = float("-inf")
                    md.logit_bias[i, self._device(p.allowed_token_ids)] = 0.0
                if p.logit_bias:
                    md.logit_bias[i, self._device(list(p.logit_bias))] += self._device(list(p.logit_bias.values()),
                                                                                       torch.float32)
            if words := [(i, t) for i, s in enumerate(seqs) for t in s.banned_words()]:
                rows, ids = zip(*words)
                md.logit_bias[self._device(list(rows)), self._device(list(ids))] = float("-inf")
        banned = [(i, s) for i, s in enumerate(seqs) if s.num_generated < s.params.min_tokens]
        if banned:
            md.banned = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=dev)
            for i, s in banned:
                ids = list(s.params.stop_token_ids or []) + list(self.eos_token_ids)  # (with ignore_eos too: vLLM's)
                md.banned[i, self._device(ids)] = True
        return md

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.params.seed
        if seed is None:
            return None
        if seq.generator is None:
            # (taken modulo 2^64, the seeds torch takes: any integer seed, and its n samples', is one)
            seed = (seed + 1_000_003 * seq.index) % 2**64
            if self.device.type == "cpu":  # its generator keeps the low 32 bits only: fold the high ones in
                seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator
