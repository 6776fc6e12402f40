"""Kill a tensor-parallel worker under a serving engine (TP = 2 over NCCL, Llama-3-8B shape, dummy weights): how
soon do health and the requests in flight learn of it? Prints one JSON line.
Env: PHASE=prefill (kill while 64 prompts of 1,800 tokens prefill; else 1 s into the decode of 150-token ones),
ASYNC=0|1 (the engine's async scheduling), KILL_AFTER_S (default 0.5 s after the prompts went in; 1 s after
the first token). Argument: how long to wait for the streams to end, in seconds."""
import asyncio
import faulthandler
import json
import os
import signal
import sys
import time

from nanoflow import LLM, SamplingParams
from nanoflow.entrypoints.async_engine import AsyncEngine, Overloaded
from nanoflow.entrypoints.metrics import Metrics


async def drain(stream):
    return [o async for _, o in stream]


async def probe(llm: LLM, served: AsyncEngine, wait_s: float, prefill: bool) -> dict:
    res = {"phase": "prefill" if prefill else "decode", "async": os.environ.get("ASYNC", "1"),
           "kill_after_s": os.environ.get("KILL_AFTER_S")}
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    streams = [await served.submit([[1 + i, 2, 3] * (600 if prefill else 50)], params) for i in range(64)]
    if not prefill:
        await anext(aiter(streams[0]))
    await asyncio.sleep(float(os.environ.get("KILL_AFTER_S", 0.5 if prefill else 1.0)))
    res["running_waiting_at_kill"] = [served.stats.running, served.stats.waiting]
    t0 = time.monotonic()
    os.kill(llm.engine.workers.procs[0].pid, signal.SIGKILL)
    while served.alive and time.monotonic() - t0 < 30:
        await asyncio.sleep(0.005)
    res["not_alive_after_s"] = round(time.monotonic() - t0, 3)
    done, pending = await asyncio.wait([asyncio.ensure_future(drain(s)) for s in streams], timeout=wait_s)
    res["streams_ended"], res["streams_pending_after_s"] = len(done), [len(pending), wait_s]
    res["errors"] = sorted({f"{type(t.exception()).__name__}: {str(t.exception())[:120]}" for t in done
                            if t.exception() is not None})
    res["ended_by_s"] = round(time.monotonic() - t0, 3)
    res["engine_thread_alive"], res["lost"] = served._thread.is_alive(), served.lost
    try:
        await served.submit([[1, 2, 3]], SamplingParams(max_tokens=3))
        res["new_submit"] = "accepted"
    except Overloaded as e:
        res["new_submit"] = f"refused: {e}"
    return res


def main():
    llm = LLM("llama-3-8b", load_format="dummy", tensor_parallel_size=2, max_model_len=2048, kv_cache_gb=8,
              async_scheduling=os.environ.get("ASYNC", "1") == "1")
    served = AsyncEngine(llm.engine, Metrics(), 4096)
    served.start()
    wait_s = float(sys.argv[1]) if len(sys.argv) > 1 else 60
    res = asyncio.run(probe(llm, served, wait_s, os.environ.get("PHASE") == "prefill"))
    print("RESULT", json.dumps({"label": os.environ.get("LABEL"), **res}), flush=True)
    if res["engine_thread_alive"]:  # where it waits
        faulthandler.dump_traceback(all_threads=True)
    os._exit(0)  # (an engine thread stuck in a collective would hold the interpreter's exit)


if __name__ == "__main__":
    main()
