"""`nanoflow serve -tp 2` (NCCL) with a worker killed under 32 streaming requests: how the streams end, and when
and how the server exits. Prints one JSON line. Env: ASYNC=0|1."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def workers(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(k) for k in f.read().split()]
    return [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]


async def stream(client, url, i, out):
    body = {"model": "llama-3-8b", "prompt": [1 + i, 2, 3] * 600, "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:") and "error" in line:
                    out.append(("error-event", line[:160]))
                    return
                n += 1
            out.append(("ended", r.status_code, n))
    except Exception as e:
        out.append(("exception", type(e).__name__))


async def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flag = "--async-scheduling" if os.environ.get("ASYNC", "1") == "1" else "--no-async-scheduling"
    log = open(os.environ.get("LOG", "/tmp/serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "nanoflow.entrypoints.cli", "serve", "llama-3-8b", "--load-format",
                             "dummy", "-tp", "2", "--max-model-len", "2048", "--kv-cache-gb", "8", flag,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url, res = f"http://127.0.0.1:{port}", {"async": os.environ.get("ASYNC", "1")}
    async with httpx.AsyncClient() as client:
        for _ in range(900):
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        out = []
        tasks = [asyncio.ensure_future(stream(client, url, i, out)) for i in range(32)]
        await asyncio.sleep(float(os.environ.get("KILL_AFTER_S", 1.5)))
        t0 = time.monotonic()
        os.kill(workers(proc.pid)[0], signal.SIGKILL)
        await asyncio.wait(tasks, timeout=60)
        res["streams_done_by_s"] = round(time.monotonic() - t0, 2)
        res["stream_endings"] = sorted({str(o[:2]) for o in out})
        res["an_error_event"] = next((o[1] for o in out if o[0] == "error-event"), None)
        res["streams_done"] = len(out)
    try:
        res["exit_code"] = proc.wait(90)
    except subprocess.TimeoutExpired:
        res["exit_code"] = "still running after 90 s"
        proc.kill()
    res["exited_by_s"] = round(time.monotonic() - t0, 2)
    print("RESULT", json.dumps(res), flush=True)


asyncio.run(main())
