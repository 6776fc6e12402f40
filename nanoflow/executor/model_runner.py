"""Turns a scheduled iteration into tensors, runs the model, samples.

The runner owns the model, the KV cache and the activation workspace. It knows nothing of text:
it returns token ids and logprob numbers; the engine turns them into outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoflow.config import EngineConfig, ModelConfig
from nanoflow.engine.scheduler import Chunk, SchedulerOutput
from nanoflow.engine.sequence import Sequence
from nanoflow.executor.cuda_graphs import GraphRunner
from nanoflow.layers.sampler import LogprobRows, SamplingMetadata, logprob_rows, sample
from nanoflow.models.batch import ForwardBatch
from nanoflow.models.llama import LlamaModel, Workspace

CPU_BATCH_TOKENS = 512
GPU_BATCH_TOKENS = 2048


@dataclass(slots=True)
class ModelOutput:
    token_ids: list[int]  # one per sampling chunk, in chunk order
    logprobs: LogprobRows | None  # for the sampled tokens, when any sequence asked
    prompt_logprobs: dict[int, LogprobRows] = field(default_factory=dict)  # chunk index -> its prompt rows


@dataclass(slots=True)
class _Plan:
    """Where each chunk's logits rows are."""
    sample_rows: list[int]  # logits row of each sampling chunk
    sample_chunks: list[Chunk]
    prompt_rows: dict[int, tuple[int, int]]  # chunk index -> (first logits row, number of rows)


class ModelRunner:
    def __init__(self, model: LlamaModel, config: EngineConfig, eos_token_ids: set[int], max_model_len: int):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.device, self.dtype = model.device, model.dtype
        self.eos_token_ids = sorted(eos_token_ids)
        on_gpu = self.device.type == "cuda"
        self.max_num_tokens = config.max_num_batched_tokens or (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS)
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        if self.num_blocks <= 0:
            raise ValueError("not enough memory for the KV cache; lower max_num_batched_tokens or raise "
                             "gpu_memory_utilization / kv_cache_gb")
        c = self.cfg
        # one spare block past the last: padding rows write their KV there
        model.kv_cache = torch.zeros(c.num_layers, 2, self.num_blocks + 1, self.block_size, c.num_kv_heads,
                                     c.head_dim, dtype=self.dtype, device=self.device)
        self.pad_slot = self.num_blocks * self.block_size
        self.ws = Workspace.allocate(c, self.max_num_tokens, self.dtype, self.device)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.graphs: GraphRunner | None = None
        if config.cuda_graph if config.cuda_graph is not None else on_gpu:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = GraphRunner(model, self.ws, self.max_num_tokens, config.max_num_seqs, max_blocks,
                                      self.pad_slot, capture=on_gpu)
            if on_gpu:
                self.graphs.capture_all()

    def _blocks_from_memory(self) -> int:
        per_block = self.cfg.kv_bytes_per_token(self.dtype) * self.block_size
        if self.device.type != "cuda":
            return int(self.config.kv_cache_gb * 2**30) // per_block
        free, total = torch.cuda.mem_get_info(self.device)
        c = self.cfg
        # activations of one full iteration, plus logits rows in float32 (with headroom for sampling)
        act = Workspace.bytes_for(c, self.max_num_tokens, self.dtype)
        logits = 4 * c.vocab_size * max(self.max_num_tokens, self.config.max_num_seqs) * 3
        usable = total * self.config.gpu_memory_utilization - (total - free) - act - logits
        return int(usable // per_block)

    # -- one iteration ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        batch, plan = self.prepare(out)
        if self.graphs is not None:
            ws = self.graphs.run(batch)
            batch = batch.to(self.device)
        else:
            batch = batch.to(self.device)
            ws = self.ws.rows(batch.num_tokens)
            self.model.forward_layers(batch, ws)
        logits = self.model.compute_logits(ws, batch)
        return self.postprocess(out, logits, plan)

    def prepare(self, out: SchedulerOutput) -> tuple[ForwardBatch, _Plan]:
        ids, pos, slots, qs, lens, tables, rows = [], [], [], [0], [], [], []
        plan = _Plan([], [], {})
        bs = self.block_size
        for i, c in enumerate(out.chunks):
            seq = c.seq
            base = len(ids)
            span = range(c.start, c.start + c.length)
            ids += seq.token_ids[c.start: c.start + c.length]
            pos += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            qs.append(base + c.length)
            lens.append(c.start + c.length)
            tables.append(seq.block_table)
            n_prompt = self._prompt_logprob_rows(c)
            if n_prompt:
                plan.prompt_rows[i] = (len(rows), n_prompt)
                rows += range(base, base + n_prompt)
            if c.samples:  # its last row is never a prompt row: that one predicts a generated token
                plan.sample_rows.append(len(rows))
                rows.append(base + c.length - 1)
                plan.sample_chunks.append(c)
        pin = self.device.type == "cuda"

        def host(x):
            t = torch.tensor(x, dtype=torch.long)
            return t.pin_memory() if pin else t
        return ForwardBatch(host(ids), host(pos), host(slots), qs, lens, tables, out.num_decode, host(rows)), plan

    @staticmethod
    def _prompt_logprob_rows(c: Chunk) -> int:
        """Rows of this chunk whose next token is a prompt token and whose prompt logprobs are wanted."""
        req = c.seq.request
        if req.prompt_logprobs is None or c.seq.index != 0 or len(req.prompt_logprobs) != c.start + 1:
            return 0  # not asked, a sibling computes it, or already done before a preemption
        # the row at position p predicts token p + 1
        return max(min(c.start + c.length, c.seq.num_prompt_tokens - 1) - c.start, 0)

    def postprocess(self, out: SchedulerOutput, logits: torch.Tensor, plan: _Plan) -> ModelOutput:
        seqs = [c.seq for c in plan.sample_chunks]
        result = ModelOutput([], None)
        if seqs:
            sample_logits = logits[plan.sample_rows]
            tokens = sample(sample_logits, self.sampling_metadata(seqs))
            k = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=-1)
            if k >= 0:
                result.logprobs = logprob_rows(sample_logits.log_softmax(-1), tokens, k)
            result.token_ids = tokens.tolist()
        for i, (first, n) in plan.prompt_rows.items():
            c = out.chunks[i]
            targets = torch.tensor(c.seq.token_ids[c.start + 1: c.start + 1 + n], device=self.device)
            k = c.seq.params.prompt_logprobs
            result.prompt_logprobs[i] = logprob_rows(logits[first: first + n].log_softmax(-1), targets, k)
        return result

    def sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        dev = self.device
        params = [s.params for s in seqs]

        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=dev)
        md = SamplingMetadata(col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"),
                              [self._generator(s) for s in seqs])
        vocab = self.cfg.vocab_size
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            md.repetition_penalty = col("repetition_penalty")
            md.presence_penalty = col("presence_penalty")
            md.frequency_penalty = col("frequency_penalty")
            md.prompt_mask = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=dev)
            md.output_counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=dev)
            for i, s in enumerate(seqs):
                md.prompt_mask[i, torch.tensor(s.token_ids[: s.num_prompt_tokens], device=dev)] = True
                out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=dev)
                md.output_counts[i].index_add_(0, out_ids, torch.ones(len(out_ids), device=dev))
        banned = [(i, s) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if banned:
            md.banned = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=dev)
            for i, s in banned:
                ids = list(s.params.stop_token_ids or []) + ([] if s.params.ignore_eos else self.eos_token_ids)
                md.banned[i, torch.tensor(ids, dtype=torch.long, device=dev)] = True
        return md

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.params.seed
        if seed is None:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seed + 1_000_003 * seq.index)
        return seq.generator
