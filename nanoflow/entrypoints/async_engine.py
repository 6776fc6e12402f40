"""What the HTTP server talks to: an EngineClient takes requests and streams their outputs back to asyncio.

AsyncEngine is the local one: the engine on a thread of its own. LLMEngine is not thread-safe, so one thread
owns it and makes every call to it: between iterations it takes the commands queued by the event loop (add,
abort, stop) and hands each RequestOutput back to the loop that asked for it (call_soon_threadsafe). HTTP work
thus never delays an iteration, and an abort (a client that went away) is applied before the next one, which
frees the request's KV blocks. The data-parallel router (dp_router.Router) is the other: replicas on Ray.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import multiprocessing.connection
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nanoflow.distributed.parallel_state import abandon_group
from nanoflow.engine.llm_engine import LLMEngine
from nanoflow.entrypoints.metrics import EngineStats, Metrics
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import Tokenizer

log = logging.getLogger("nanoflow.server")

ACCEPTED, _GONE, _ABORT_ALL, _STOP = object(), object(), object(), object()  # ACCEPTED: a sink's first answer
# A step that a worker's exit fails (gloo's exchange of the batch) stops the engine thread within this; one
# stuck in the iteration's NCCL collectives (no timeout: the watchdog's abort is off) is failed around it.
STUCK_S = 5.0


class Overloaded(Exception):
    """Not now: the waiting queue is full, or no engine is running (HTTP 503, retry later)."""


class EngineLost(Overloaded):
    """The engine serving a request went away after its output had started (a replica died): retry it."""


class ShuttingDown(Overloaded):
    """The server is shutting down: it takes no new requests (a beam search's next step ends it, aborted)."""


class ClientDisconnected(Exception):
    pass


@dataclass(slots=True)
class _Sink:
    """Where a submission's answer (ACCEPTED or an exception), then its outputs, are delivered: a queue of the
    submitter's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item) -> None:
        _deliver(self.loop, [(self.queue, item)])


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Put the items into their queues on the loop's thread: one wake-up of the loop for them all."""
    def put_all():
        for q, item in items:
            q.put_nowait(item)
    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the loop is closed: nobody listens any more
        pass


@dataclass(slots=True)
class Submission:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    sink: _Sink
    priority: int = 0


class EngineClient(abc.ABC):
    """Requests in (submit), their outputs out as a RequestStream, with the waiting queue's bound and the
    request metrics. A subclass hands each submission to an engine (_add), which answers on its sink, and
    aborts requests (_abort)."""
    tokenizer: Tokenizer | None
    max_model_len: int
    model_path: str  # where the model came from (the served name's default)
    sampling_defaults: dict  # from the model's generation config: what a request leaves unset
    eos_token_ids: set[int]  # the tokens that end a sequence (beam search ends beams at them)
    lost: str | None = None  # why the engine stopped for good, if it did (the server then exits)
    shutting_down = False  # (drain() was called: new submissions are refused)

    def __init__(self, metrics: Metrics, max_waiting_requests: int):
        self.metrics = metrics
        self.max_waiting = max_waiting_requests
        self.num_waiting = 0  # event-loop side: accepted engine requests that have no token yet

    @abc.abstractmethod
    def start(self) -> None:
        """On the event loop that will submit."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Abort whatever is still unfinished and stop."""

    @abc.abstractmethod
    def abort_all(self) -> None:
        """End every request now with finish_reason "abort" (their streams end normally)."""

    def drain(self) -> None:
        """At shutdown, once the grace period is over: abort every request, and take no new one (a beam search
        would otherwise go on with its next step)."""
        self.shutting_down = True
        self.abort_all()

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether requests can be served."""

    @abc.abstractmethod
    def _add(self, add: Submission) -> None:
        """Hand the requests to an engine, all or none: it puts ACCEPTED or the exception that refused them
        (ValueError, TypeError, Overloaded) on add.sink, then their RequestOutputs (or an exception)."""

    @abc.abstractmethod
    def _abort(self, request_id: str) -> None:
        """End the request now; its sink gets nothing more."""

    async def submit(self, prompts: list[list[int]], params: SamplingParams,
                     until_disconnected: Callable[[], Awaitable] | None = None,
                     base_id: str | None = None, priority: int = 0) -> RequestStream:
        """Queue one engine request per prompt, all or none. Returns once the engine accepted them; raises
        Overloaded when the waiting queue is full, or the engine's error (ValueError, TypeError) for bad input.
        until_disconnected(): resolves when the client goes away; the requests are then aborted.
        base_id: the requests' ids are base_id-0, base_id-1, ... (default: a fresh one)."""
        if not self.alive:
            raise Overloaded("the engine is not running")
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        if len(prompts) > self.max_waiting:
            raise ValueError(f"{len(prompts)} prompts are more than the server queues (--max-waiting-requests "
                             f"{self.max_waiting})")
        if self.num_waiting + len(prompts) > self.max_waiting:
            raise Overloaded(f"the server is overloaded: {self.num_waiting} requests wait for a first token "
                             f"(--max-waiting-requests {self.max_waiting})")
        sink = _Sink(asyncio.get_running_loop())
        stream = RequestStream(self, base_id or uuid.uuid4().hex, len(prompts), sink)
        self.num_waiting += len(prompts)
        self._add(Submission(stream.request_ids, prompts, params, sink, priority))
        try:
            answer = await sink.queue.get()
        except BaseException:  # cancelled: the engine may still take the requests, so abort them
            stream.close()
            raise
        if answer is not ACCEPTED:
            stream.close(abort=False)  # the engine took none of them
            raise answer
        self.metrics.on_accepted(prompts, params, self.max_model_len)
        if until_disconnected is not None:
            stream.watch(until_disconnected)
        return stream


class AsyncEngine(EngineClient):
    """The local engine, on a thread of its own."""

    def __init__(self, engine: LLMEngine, metrics: Metrics, max_waiting_requests: int, stream_interval: int = 1):
        super().__init__(metrics, max_waiting_requests)
        if stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, not {stream_interval}")
        self.engine = engine
        # a request's output goes out on its first token, then once per stream_interval new tokens, and when it
        # ends: the front end's cost is per output (outputs are cumulative, so the ones skipped lose nothing)
        self.stream_interval = stream_interval
        self._sent: dict[str, int] = {}  # engine thread only: tokens of each request already sent
        self.tokenizer, self.max_model_len, self.model_path = engine.tokenizer, engine.max_model_len, engine.source.path
        self.sampling_defaults, self.eos_token_ids = engine.sampling_defaults, engine.eos_token_ids
        self.stats = EngineStats()  # after the last iteration (written by the engine thread only)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # commands for the engine thread
        self._sinks: dict[str, _Sink] = {}  # under _lock: the engine thread's, the watcher's if that thread is stuck
        self._thread = threading.Thread(target=self._run, name="nanoflow-engine", daemon=True)
        self._lock = threading.RLock()
        self._watcher = None if engine.workers is None else threading.Thread(
            target=self._watch, args=([p.sentinel for p in engine.workers.procs],), name="nanoflow-watch", daemon=True)

    # -- the event loop's side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self._watcher is not None:
            self._watcher.start()

    def stop(self) -> None:
        self._inbox.put(_STOP)
        while self._thread.is_alive():  # (a thread stuck in a collective on a dead peer stays behind)
            self._thread.join(0.1)
            if self.lost is not None:  # (the watcher gave it STUCK_S already)
                return
            if self.engine.lost_workers():
                self._thread.join(STUCK_S)
                return

    def abort_all(self) -> None:
        """Thread-safe."""
        self._inbox.put(_ABORT_ALL)

    @property
    def alive(self) -> bool:
        # (a worker that exited counts at once: with NCCL the step's collective may hang a while before it fails)
        return self.lost is None and self._thread.is_alive() and not self.engine.lost_workers()

    def _add(self, add: Submission) -> None:
        self._inbox.put(add)
        if self.lost is not None:  # the engine stopped as this came: answer it (draining twice is harmless)
            self._refuse_queued()

    def _abort(self, request_id: str) -> None:
        self._inbox.put(request_id)

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            try:  # idle: sleep until a command comes; busy: take what is queued and go on
                cmd = self._inbox.get(block=not engine.has_unfinished_requests())
                while cmd is not _STOP:
                    with self._lock:
                        self._handle(cmd)
                    cmd = self._inbox.get_nowait()
                self._abort_all()
                return
            except queue.Empty:
                pass
            try:
                outputs = engine.step()
            except Exception as e:
                log.exception("engine step failed")
                # A worker that exited failed it (gloo's closed socket): no iteration can run again, so stop (health
                # says so) and fail what is in flight as the engine's loss (503), not as the socket's error (500).
                if lost := engine.lost_workers(wait_s=1.0):
                    self._lose(lost)
                if self.lost is not None:  # (or the watcher stopped it while this step hung)
                    return
                self._fail_all(e)  # a bug: fail what is in flight, keep serving
                continue
            by_loop = defaultdict(list)
            with self._lock:  # (delivered under it too: nothing after the watcher's EngineLost)
                for out in outputs:
                    if (sink := self._due(out)) is not None:
                        by_loop[sink.loop].append((sink.queue, out))
                for loop, items in by_loop.items():
                    _deliver(loop, items)
            self._on_step()

    def _due(self, out: RequestOutput) -> _Sink | None:
        """The sink to send this output to now, if it is due."""
        rid = out.request_id
        if out.finished:
            self._sent.pop(rid, None)
            return self._sinks.pop(rid, None)
        if self.stream_interval > 1:  # (the default, 1: every output, no counting)
            # (counted per choice: a request's n choices step together)
            tokens, sent = max(len(c.token_ids) for c in out.outputs), self._sent.get(rid, 0)
            if tokens - sent < self.stream_interval and sent > 0:
                return None
            self._sent[rid] = tokens
        return self._sinks.get(rid)

    def _watch(self, sentinels: list) -> None:
        """(Its own thread, under tensor parallelism.) A worker that exits while the engine thread waits in a
        collective may leave it waiting for good (NCCL's): the requests in flight then fail from here."""
        multiprocessing.connection.wait(sentinels)
        self._thread.join(STUCK_S)  # (a failed step stops it: it said why)
        if self._thread.is_alive() and (lost := self.engine.lost_workers()):  # (none at a shutdown)
            abandon_group()  # (that thread waits in a collective: the process must end without finalizing)
            self._lose(lost)

    def _lose(self, lost: list[str]) -> None:
        """Stop for good: the workers named exited, so no iteration can run again. Fails what is in flight and
        what is queued."""
        with self._lock:
            if self.lost is not None:  # (the watcher was first: the stuck step came back)
                return
            self.lost = f"tensor-parallel workers {', '.join(lost)} exited"
            log.error("the engine stops: %s", self.lost)
            for sink in self._sinks.values():
                sink.put(self._stopped())
            self._sinks.clear()
        self._refuse_queued()

    def _handle(self, cmd) -> None:
        if isinstance(cmd, Submission) and self.lost is not None:  # (taken while the watcher stopped the engine)
            cmd.sink.put(self._stopped())
            return
        if isinstance(cmd, str):  # an abort
            self._sinks.pop(cmd, None)
            self._sent.pop(cmd, None)
            self.engine.abort_request(cmd)
            return
        if cmd is _ABORT_ALL:
            self._abort_all()
            return
        added = []
        try:
            for rid, prompt in zip(cmd.request_ids, cmd.prompts):
                self.engine.add_request(rid, prompt, cmd.params, cmd.priority)
                added.append(rid)
        except Exception as e:  # bad input (ValueError, TypeError): take none of them
            for rid in added:  # only those added here: an id already in use belongs to another request
                self.engine.abort_request(rid)
            cmd.sink.put(e)
            return
        self._sinks.update(dict.fromkeys(cmd.request_ids, cmd.sink))
        cmd.sink.put(ACCEPTED)

    def _refuse_queued(self) -> None:
        """Answer the submissions still queued for the engine thread, which stopped and will not take them."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Submission):
                cmd.sink.put(self._stopped())

    def _stopped(self) -> EngineLost:
        return EngineLost(f"the engine stopped: {self.lost}")

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for rid, sink in self._sinks.items():
                sink.put(error)
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    log.exception("abort after a failed step")
            self._sinks.clear()

    def _abort_all(self) -> None:
        with self._lock:
            for rid in list(self.engine.requests):
                out = self.engine.abort_request(rid)
                if (sink := self._sinks.pop(rid, None)) is not None:
                    sink.put(out)
        self._on_step()

    def _on_step(self) -> None:
        self.stats = EngineStats.of(self.engine)
        self.metrics.on_stats(self.stats)


class RequestStream:
    """The outputs of one submission, as (prompt index, cumulative RequestOutput). close() aborts what is
    unfinished; it is idempotent, and called on disconnect, so cleanup does not wait for the iterator's
    owner to be finalized."""

    def __init__(self, owner: EngineClient, base_id: str, num_prompts: int, sink: _Sink):
        self.id = base_id
        self.request_ids = [f"{base_id}-{i}" for i in range(num_prompts)]
        self._owner = owner
        self._sink = sink
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        self._unfinished = set(self.request_ids)
        self._no_token = set(self.request_ids)  # counted in owner.num_waiting
        self._arrival = time.monotonic()
        self._first_token: dict[str, float] = {}
        self._last: dict[str, RequestOutput] = {}
        self._longest: dict[str, tuple[int, float]] = {}  # its longest sequence's tokens so far, and when they came
        self._watcher: asyncio.Task | None = None
        self._gone = False
        self._held = None  # an item taken from the queue while coalescing, not yet returned

    def watch(self, until_disconnected: Callable[[], Awaitable]) -> None:
        async def watch():
            await until_disconnected()
            self._gone = True
            self.close()
            self._sink.queue.put_nowait(_GONE)  # wake the reader
        self._watcher = asyncio.ensure_future(watch())

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._gone:
            raise ClientDisconnected()
        if not self._unfinished:
            raise StopAsyncIteration
        queue = self._sink.queue
        item, self._held = self._held or await queue.get(), None
        # A reader that fell behind finds several outputs of a request waiting: they are cumulative, so the latest
        # stands for them all, and one event carries their tokens (the HTTP layer's cost is per event).
        while isinstance(item, RequestOutput) and not queue.empty():
            nxt = queue.get_nowait()
            if isinstance(nxt, RequestOutput) and nxt.request_id == item.request_id:
                item = nxt
            else:
                self._held = nxt
                break
        if item is _GONE:
            raise ClientDisconnected()
        if isinstance(item, Exception):  # the engine failed
            self.close()
            raise item
        rid, now = item.request_id, time.monotonic()
        self._last[rid] = item
        longest = max((len(c.token_ids) for c in item.outputs), default=0)
        if rid in self._no_token and (longest or item.finished):
            self._no_token.discard(rid)
            self._owner.num_waiting -= 1
            if longest:
                self._first_token[rid] = now
                self._owner.metrics.ttft.observe(now - self._arrival)
        elif longest > (seen := self._longest.get(rid, (0, now)))[0]:
            self._owner.metrics.on_tokens(longest - seen[0], now - seen[1])
        if longest:
            self._longest[rid] = longest, now
        if item.finished:
            self._unfinished.discard(rid)
            self._finished(rid, now)
            if not self._unfinished:
                self.close()
        return self._index[rid], item

    def _finished(self, rid: str, now: float) -> None:
        self._owner.metrics.on_finished(self._last.get(rid), self._arrival, self._first_token.get(rid), now)

    def close(self, abort: bool = True) -> None:
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._owner.num_waiting -= len(self._no_token)
        self._no_token.clear()
        for rid in self._unfinished if abort else ():
            self._owner._abort(rid)
            self._finished(rid, time.monotonic())
        self._unfinished.clear()
