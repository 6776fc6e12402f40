"""The data-parallel front end: an EngineClient over N engine replicas on Ray (distributed/replica.py), so that
`nanoflow serve --data-parallel-size N` serves them behind one OpenAI-compatible endpoint.

Routing: a submission goes to the up replica with the lowest score, the share of its KV cache committed to
unfinished requests by this router (prompt + most new tokens: exact and immediate) plus the share in use that
the replica last reported (it sees what the count cannot: prefix-cache hits, preemptions). With prefix caching,
a prompt whose first KV blocks a replica got before goes there again, unless that replica's score exceeds the
lowest by more than AFFINITY_SLACK (bounded imbalance).

Failure: when a replica's stream breaks (its actor died), it leaves the rotation; each of its submissions
that had delivered no output yet is sent once to another replica, the others fail with EngineLost (503 / an
SSE error event). Ray restarts the actor; its stream's first message puts it back in rotation.

Metrics: latencies are measured here, as clients see them; the engine gauges and the prefix cache's counters
are the replicas' added up (KV use: their mean); nanoflow_router_requests / _retries / nanoflow_replica_up
are the router's. With several API-server processes (entrypoints/api_servers.py) each has a router, `front` k:
each counts its own requests, and only front end 0 reports the replicas' gauges, so that the processes' metrics
add up.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import ray
from prometheus_client import Counter, Gauge
from ray.exceptions import RayActorError

from nanoflow.distributed.replica import ReplicaInfo, launch_replicas, patch
from nanoflow.entrypoints.async_engine import ACCEPTED, EngineClient, EngineLost, Overloaded, Submission
from nanoflow.entrypoints.metrics import EngineStats, Metrics
from nanoflow.outputs import RequestOutput

log = logging.getLogger("nanoflow.server")

AFFINITY_SLACK = 0.25  # in shares of a replica's KV cache
AFFINITY_BLOCKS = 64  # a prompt's prefix keys: its first full KV blocks, at most this many
AFFINITY_ENTRIES = 1 << 18  # prefix keys remembered, least recently used forgotten first
RESUBSCRIBE_S = 1.0  # after a replica's stream broke, before reading it again


@dataclass(eq=False)
class _Replica:
    index: int
    actor: ray.actor.ActorHandle
    info: ReplicaInfo
    up: bool = True
    committed: int = 0  # tokens of the unfinished submissions routed here: prompts + most new tokens
    stats: EngineStats = field(default_factory=EngineStats)  # as last reported

    def score(self) -> float:
        return self.committed / self.info.kv_tokens + self.stats.kv_usage


@dataclass(eq=False)
class _Route:
    """A submission in flight: where it is, what it costs there, how far its outputs are."""
    add: Submission
    keys: list[int]  # its prefix keys
    cost: int
    unfinished: int  # its requests without a finished output
    replica: _Replica | None = None
    accepted: bool = False
    delivered: bool = False  # an output went to the client side: it cannot start over
    retried: bool = False
    last: dict[str, RequestOutput] = field(default_factory=dict)  # by request id, cumulative


class _PrefixAffinity:
    """Which replica last got each prompt prefix, by chained hashes of the prompt's first full KV blocks (the
    units the engines' prefix caches share)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.owner: OrderedDict[int, int] = OrderedDict()  # prefix key -> replica index

    def keys(self, prompt: list[int]) -> list[int]:
        keys, h, bs = [], 0, self.block_size
        for i in range(min(len(prompt) // bs, AFFINITY_BLOCKS)):
            h = hash((h, *prompt[i * bs:(i + 1) * bs]))
            keys.append(h)
        return keys

    def lookup(self, keys: list[int]) -> int | None:
        """The replica that got the longest of these prefixes."""
        return next((self.owner[k] for k in reversed(keys) if k in self.owner), None)

    def record(self, keys: list[int], replica: int) -> None:
        for k in keys:
            self.owner[k] = replica
            self.owner.move_to_end(k)
        while len(self.owner) > AFFINITY_ENTRIES:
            self.owner.popitem(last=False)


class Router(EngineClient):
    def __init__(self, replicas: list[tuple[ray.actor.ActorHandle, ReplicaInfo]], metrics: Metrics,
                 max_waiting_requests: int, front: int = 0):
        super().__init__(metrics, max_waiting_requests)
        self.front = front  # which API-server process this router serves (its stream from each replica)
        info = replicas[0][1]
        self.tokenizer, self.max_model_len, self.model_path = info.tokenizer, info.max_model_len, info.model_path
        self.sampling_defaults, self.eos_token_ids = info.sampling_defaults, info.eos_token_ids
        self.replicas = [_Replica(i, actor, about) for i, (actor, about) in enumerate(replicas)]
        self.affinity = _PrefixAffinity(info.block_size) if info.prefix_caching else None
        self.routes: dict[str, _Route] = {}  # by submission id
        self.retired = EngineStats()  # the counters of replicas' past lives (the totals never decrease)
        self.readers: list[asyncio.Task] = []
        r = metrics.registry
        self.sent = Counter("nanoflow_router_requests", "Submissions sent to each replica", ["replica"], registry=r)
        self.resent = Counter("nanoflow_router_retries", "Submissions sent again: their replica died before any "
                                                         "output", registry=r)
        self.in_rotation = Gauge("nanoflow_replica_up", "1 while a replica is in rotation", ["replica"], registry=r)
        self._rotation(True)

    @classmethod
    def launch(cls, model: str | None, engine_kwargs: dict, num_replicas: int, ray_address: str | None,
               max_waiting_requests: int, stream_interval: int = 1, model_name: str = "") -> Router:
        """Start the replicas (each queues up to max_waiting_requests, as does the router in all); model_name: the
        metrics' label."""
        replicas = launch_replicas(model, engine_kwargs, num_replicas, ray_address, max_waiting_requests,
                                   stream_interval)
        return cls(replicas, Metrics(model_name), max_waiting_requests)

    @classmethod
    def attach(cls, ray_address: str, namespace: str, num_replicas: int, max_waiting_requests: int,
               front: int, model_name: str = "") -> Router:
        """A router over replicas that another process launched (by their names in its Ray namespace)."""
        ray.init(address=ray_address, namespace=namespace)
        actors = [ray.get_actor(f"replica-{i}") for i in range(num_replicas)]
        return cls(list(zip(actors, ray.get([a.info.remote() for a in actors]))), Metrics(model_name),
                   max_waiting_requests, front)

    # -- EngineClient ----------------------------------------------------------------------------
    def start(self) -> None:
        self.readers = [asyncio.ensure_future(self._read(r)) for r in self.replicas]

    def stop(self) -> None:
        """Stop reading, and leave Ray: the replicas end with this driver (and Ray itself, if it started here)."""
        for task in self.readers:
            task.cancel()
        ray.shutdown()

    def abort_all(self) -> None:
        for r in self.replicas:
            if r.up:
                r.actor.abort_all.remote()

    @property
    def alive(self) -> bool:
        return any(r.up for r in self.replicas)

    def _add(self, add: Submission) -> None:
        params, n = add.params, add.params.n
        cost = 0
        for p in add.prompts:
            room = max(self.max_model_len - len(p), 0)
            cost += len(p) + n * min(params.max_tokens or room, room)
        route = _Route(add, self.affinity.keys(add.prompts[0]) if self.affinity else [], cost, len(add.prompts))
        if not self._send(route):
            add.sink.queue.put_nowait(Overloaded("no replica is up"))

    def _abort(self, request_id: str) -> None:
        base = _submission(request_id)
        if (route := self.routes.get(base)) is not None:
            self._end(base, route)
            route.replica.actor.abort.remote(base)

    # -- routing ---------------------------------------------------------------------------------
    def _pick(self, keys: list[int]) -> _Replica | None:
        up = [r for r in self.replicas if r.up]
        if not up:
            return None
        best = min(up, key=_Replica.score)
        if keys and (i := self.affinity.lookup(keys)) is not None:
            r = self.replicas[i]
            if r.up and r.score() <= best.score() + AFFINITY_SLACK:
                return r
        return best

    def _send(self, route: _Route) -> bool:
        r = self._pick(route.keys)
        if r is None:
            return False
        base = _submission(route.add.request_ids[0])
        self.routes[base] = route
        route.replica = r
        r.committed += route.cost
        self.sent.labels(str(r.index)).inc()
        if self.affinity:
            self.affinity.record(route.keys, r.index)
        r.actor.add.remote(self.front, base, route.add.prompts, route.add.params,  # answered on the stream
                           route.add.priority)
        return True

    def _end(self, base: str, route: _Route) -> None:
        del self.routes[base]
        route.replica.committed -= route.cost

    # -- the replicas' streams -------------------------------------------------------------------
    async def _read(self, r: _Replica) -> None:
        """Replica r's stream, for as long as the router runs. When it breaks, r is lost; the stream is then
        asked for again, which Ray holds until it has restarted the actor."""
        while True:
            try:
                async for ref in r.actor.outputs.remote(self.front):
                    stats, items = await ref
                    if not r.up:
                        log.warning("replica %d is back in rotation", r.index)
                        r.up = True
                        self._rotation(True, r)
                    self._take(r, stats)
                    for base, item in items:
                        self._dispatch(r, base, item)
                    self._update_stats()
            except RayActorError as e:
                self._lost(r, e)
            await asyncio.sleep(RESUBSCRIBE_S)

    def _take(self, r: _Replica, stats: EngineStats) -> None:
        """A replica's report. A new life of it (Ray restarted the actor: its counters start again) retires its last
        life's counters, kept until then (a lost connection to an actor that lives on does not start them again)."""
        if stats.restarted_since(r.stats):
            self.retired = self.retired.counted_with(r.stats)
        r.stats = stats

    def _dispatch(self, r: _Replica, base: str, item) -> None:
        route = self.routes.get(base)
        if route is None or route.replica is not r:  # aborted
            return
        sink = route.add.sink.queue
        if item is None:
            if not route.accepted:  # (a submission sent again was accepted already)
                route.accepted = True
                sink.put_nowait(ACCEPTED)
        elif isinstance(item, Exception):  # refused, or the replica's engine failed
            self._end(base, route)
            sink.put_nowait(item)
        else:
            route.delivered = True
            rid = item.request_id
            prompt = route.add.prompts[route.add.request_ids.index(rid)]
            out = route.last[rid] = patch(route.last.get(rid), item, prompt)
            sink.put_nowait(out)
            if out.finished:
                route.unfinished -= 1
                if not route.unfinished:
                    self._end(base, route)

    def _lost(self, r: _Replica, error: RayActorError) -> None:
        if r.up:
            log.warning("replica %d failed, out of rotation until Ray restarts it: %s", r.index, error)
        r.up = False
        self._rotation(False, r)
        for base, route in [(b, route) for b, route in self.routes.items() if route.replica is r]:
            self._end(base, route)
            r.actor.abort.remote(base)  # in case the actor lives on (a lost connection): no work twice
            if not route.delivered and not route.retried:
                route.retried = True
                self.resent.inc()
                if self._send(route):
                    continue
            route.add.sink.queue.put_nowait(EngineLost(f"replica {r.index}, which served this request, failed"))
        self._update_stats()

    def _rotation(self, up: bool, r: _Replica | None = None) -> None:
        if self.front == 0:  # (the replicas' metrics: one front end's)
            for rep in [r] if r else self.replicas:
                self.in_rotation.labels(str(rep.index)).set(int(up))

    def _update_stats(self) -> None:
        if self.front:
            return
        # the gauges of the replicas in rotation; the counters of all, and of their past lives
        down = EngineStats.total([r.stats for r in self.replicas if not r.up]).counted_with(self.retired)
        self.metrics.on_stats(EngineStats.total([r.stats for r in self.replicas if r.up]).counted_with(down))


def _submission(request_id: str) -> str:
    """A request's submission id (request ids are SUBMISSION-INDEX)."""
    return request_id.rpartition("-")[0]
