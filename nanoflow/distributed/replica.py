"""Data-parallel engine replicas: Ray actors, each with its own engine and devices (a GPU, a tensor-parallel
group's GPUs, or CPU cores), placed by one placement group over the nodes of a Ray cluster.

A replica takes requests by `add` and sends the outputs of all of them back on one stream per front end
(API-server process), `outputs`: a message per engine iteration, so that Ray carries one object per iteration
and replica, not one per token and request (Ray's streaming generators carry about a thousand objects a second).
A message holds what is new in each request since the last one (`diff`; the router rebuilds the cumulative
output with `patch`): sending whole outputs would cost time quadratic in the output's length. Imported only with
--data-parallel-size (Ray is an optional dependency).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import nanoflow
from nanoflow.engine.llm_engine import LLMEngine
from nanoflow.entrypoints.async_engine import AsyncEngine, ClientDisconnected, Overloaded, RequestStream
from nanoflow.entrypoints.metrics import Metrics
from nanoflow.executor.model_runner import settle_gc
from nanoflow.models.loader import resolve
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import Tokenizer

log = logging.getLogger("nanoflow.replica")
POLL_S = 0.5  # a replica sends its stats at least this often, outputs or not: its load, and that it lives
# Ray runs an async actor's calls out of order: an abort may overtake its submission's add (one whose arguments
# wait in the object store); the replica remembers such an abort this long, so that the add it names is dropped
EARLY_ABORT_S = 60.0
PLACEMENT_TIMEOUT_S = 120
# the directory that holds the nanoflow package: on the workers' PYTHONPATH, so that they import this nanoflow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nanoflow.__file__)))


@dataclass(slots=True)
class ReplicaInfo:
    """What the router needs of the model and of a replica's engine."""
    tokenizer: Tokenizer | None
    max_model_len: int
    model_path: str
    sampling_defaults: dict
    kv_tokens: int  # the KV cache's capacity
    block_size: int
    prefix_caching: bool
    eos_token_ids: set[int] = frozenset()


class Replica:
    """One engine on its thread (AsyncEngine), in a Ray actor. Its request metrics are not read: the router
    measures latencies itself, as its clients see them; the replica sends its EngineStats."""

    def __init__(self, model: str | None, engine_kwargs: dict, max_waiting_requests: int, stream_interval: int = 1):
        engine = LLMEngine(model, **engine_kwargs)
        blocks = engine.scheduler.blocks
        self._info = ReplicaInfo(engine.tokenizer, engine.max_model_len, engine.source.path, engine.sampling_defaults,
                                 blocks.num_blocks * blocks.block_size, blocks.block_size, blocks.caching,
                                 engine.eos_token_ids)
        self.engine = AsyncEngine(engine, Metrics(), max_waiting_requests, stream_interval)
        settle_gc()
        self.engine.start()
        self.outboxes: dict[int, asyncio.Queue] = {}  # by front end: (submission id, item) for its current stream
        self.aborts: dict[str, asyncio.Event] = {}  # by submission id: set when the router aborts it
        self.early_aborts: dict[str, float] = {}  # aborts of submissions not (yet) here: id -> when (EARLY_ABORT_S)
        self.forwarders: set[asyncio.Task] = set()

    async def info(self) -> ReplicaInfo:
        return self._info

    def _put(self, front: int, item) -> None:
        self.outboxes.setdefault(front, asyncio.Queue()).put_nowait(item)

    async def add(self, front: int, base_id: str, prompts: list[list[int]], params: SamplingParams,
                  priority: int = 0) -> None:
        """Submit; the answer goes on front end `front`'s stream (None: accepted, or the exception that refused
        it), then the outputs."""
        if self.early_aborts.pop(base_id, None) is not None:  # its abort came first: the router has forgotten it
            return
        aborted = self.aborts[base_id] = asyncio.Event()  # before any await: an abort run after this call finds it
        try:
            stream = await self.engine.submit(prompts, params, aborted.wait, base_id, priority)
        except (Overloaded, ValueError, TypeError) as e:
            del self.aborts[base_id]
            self._put(front, (base_id, e))
            return
        self._put(front, (base_id, None))
        task = asyncio.ensure_future(self._forward(front, base_id, stream))
        self.forwarders.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(self.forwarders.discard)

    async def _forward(self, front: int, base_id: str, stream: RequestStream) -> None:
        sent: dict[str, list[tuple[int, int]]] = {}
        try:
            async for _, out in stream:
                self._put(front, (base_id, diff(out, sent.get(out.request_id))))
                sent[out.request_id] = [(len(c.text), len(c.token_ids)) for c in out.outputs]
        except ClientDisconnected:  # aborted by the router
            pass
        except Exception as e:  # the engine failed
            self._put(front, (base_id, e))
        finally:
            self.aborts.pop(base_id, None)

    async def abort(self, base_id: str) -> None:
        if (aborted := self.aborts.get(base_id)) is not None:
            aborted.set()
            return
        now = time.monotonic()  # (ended already, or its add not run yet: remembered a while, for the add)
        self.early_aborts = {b: t for b, t in self.early_aborts.items() if now - t < EARLY_ABORT_S} | {base_id: now}

    async def abort_all(self) -> None:
        self.engine.abort_all()

    @ray.method(num_returns="streaming")
    async def outputs(self, front: int = 0):
        """Front end `front`'s stream, for one reader (its router): (EngineStats, [(submission id, item)]), the
        items being None (accepted), an exception (refused, or the engine failed) or a RequestOutput delta.
        A new call (the router lost the previous stream) ends the previous one: one reader per queue; what
        waited in the old queue moves to the new one."""
        outbox, old = asyncio.Queue(), self.outboxes.get(front)
        while old is not None and not old.empty():
            outbox.put_nowait(old.get_nowait())
        self.outboxes[front] = outbox
        while self.outboxes[front] is outbox:
            if self.engine.lost:  # the engine stopped for good: exit as a crash, so that Ray restarts the replica
                log.error("replica exits: %s", self.engine.lost)
                self.engine.engine.shutdown()  # (the other workers, which os._exit would leave behind)
                os._exit(1)
            try:
                items = [await asyncio.wait_for(outbox.get(), POLL_S)]
            except TimeoutError:
                items = []
            while not outbox.empty():  # what the same iteration delivered
                items.append(outbox.get_nowait())
            yield self.engine.stats, items


def diff(out: RequestOutput, sent: list[tuple[int, int]] | None) -> RequestOutput:
    """What is new in out after (text length, token count) of each completion were sent (None: nothing was):
    the text and tokens past them, with their logprobs. The prompt's ids stay here (the router has them), its
    logprobs go with the first delta, the engine's timestamps with the last (this process's clock: the router's
    metrics take only their differences)."""
    outs = []
    for c in out.outputs:
        chars, tokens = sent[c.index] if sent else (0, 0)
        logprobs = None if c.logprobs is None else c.logprobs[tokens:]
        outs.append(CompletionOutput(c.index, c.text[chars:], c.token_ids[tokens:], c.cumulative_logprob, logprobs,
                                     c.finish_reason, c.stop_reason))
    first = sent is None
    return RequestOutput(out.request_id, out.prompt if first else None, [], outs,
                         out.prompt_logprobs if first else None, out.finished, out.metrics if out.finished else {},
                         out.num_cached_tokens)


def patch(prev: RequestOutput | None, delta: RequestOutput, prompt_token_ids: list[int]) -> RequestOutput:
    """The cumulative output again: prev (None before the first delta) extended by delta, in new lists (prev may
    still be waiting to be read)."""
    outs = []
    for c in delta.outputs:
        p = prev.outputs[c.index] if prev else CompletionOutput(c.index, "", [], logprobs=[])
        logprobs = None if c.logprobs is None else p.logprobs + c.logprobs
        outs.append(CompletionOutput(c.index, p.text + c.text, p.token_ids + c.token_ids, c.cumulative_logprob,
                                     logprobs, c.finish_reason, c.stop_reason))
    first = prev or delta
    return RequestOutput(delta.request_id, first.prompt, prompt_token_ids, outs, first.prompt_logprobs,
                         delta.finished, delta.metrics, delta.num_cached_tokens)


def launch_replicas(model: str | None, engine_kwargs: dict, num_replicas: int, ray_address: str | None,
                    max_waiting_requests: int, stream_interval: int = 1, namespace: str | None = None
                    ) -> list[tuple[ray.actor.ActorHandle, ReplicaInfo]]:
    """Join the Ray cluster at ray_address (None: Ray's default, $RAY_ADDRESS, else the cluster `ray start` began
    on this machine, else a new one here), reserve a bundle per replica (its GPUs, or CPU cores) in one placement
    group spread over the nodes, start the replicas there, as the actors replica-0, replica-1, ... of the Ray
    namespace (other API-server processes find them by name), and wait for them to load. Ray restarts a replica
    that dies, in its bundle."""
    # a wrong model fails here, plainly, rather than in every replica (the nodes see the same paths)
    resolve(model, revision=engine_kwargs.get("revision"), hf_overrides=engine_kwargs.get("hf_overrides"))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    ray.init(address=ray_address, namespace=namespace, runtime_env={"env_vars": env},
             include_dashboard=False)  # (if it starts Ray)
    try:
        tp = engine_kwargs["tensor_parallel_size"]
        gpu = engine_kwargs["device"] != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"GPU": tp, "CPU": 1} if gpu else {"CPU": tp}
        group = placement_group([bundle] * num_replicas, strategy="SPREAD")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise ValueError(f"the Ray cluster cannot place {num_replicas} replicas of {bundle} within "
                             f"{PLACEMENT_TIMEOUT_S} s; it has {ray.cluster_resources()}") from None
        actor = ray.remote(Replica)
        replicas = [actor.options(
            name=f"replica-{i}", max_restarts=-1, max_task_retries=0,
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote(model, engine_kwargs, max_waiting_requests, stream_interval) for i in range(num_replicas)]
        try:
            return list(zip(replicas, ray.get([r.info.remote() for r in replicas])))
        except ray.exceptions.RayActorError as e:  # (e.g. an engine that refused its options): why, in one line
            raise ValueError(f"a replica could not start: {_cause(e)}") from e
    except BaseException:
        ray.shutdown()
        raise


def _cause(error: Exception) -> str:
    """The replica's own exception, the last 'SomeError: message' line of Ray's report (else its first line)."""
    lines = [line.strip() for line in str(error).splitlines()] or [type(error).__name__]
    return next((line for line in reversed(lines) if re.match(r"\w+(Error|Exception): ", line)), lines[0])
