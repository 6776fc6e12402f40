"""The data-parallel front end's CPU cost per streamed token and per request (the capacity model's X_fe, see
docs/data_parallel.md), on any machine, no GPU: N replicas of the default model on Ray whose model runner is
replaced by one that returns tokens at once after STEP_MS (a GPU's iteration), behind the real router and HTTP
routes in this process; `bench serve` (a subprocess) streams the workload through them. This process's CPU time
over the run is the front end's (its event loop, and Ray's threads receiving the replicas' streams).

    python benchmarks/dp_frontend.py [--replicas 2] [--step-ms 25] [--workload const:100:200] [--num-requests 400]
                                     [--stream-interval 1]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import ray
import uvicorn

from nanoflow.distributed.replica import ROOT, Replica
from nanoflow.entrypoints.dp_router import Router
from nanoflow.entrypoints.metrics import Metrics
from nanoflow.entrypoints.server import build_app
from nanoflow.executor.model_runner import ModelOutput


class InstantRunner:
    def __init__(self, step_s: float):
        self.step_s = step_s

    def launch(self, out):
        return [500] * sum(1 for c in out.chunks if c.samples)

    def collect(self, tokens):
        time.sleep(self.step_s)
        return ModelOutput(tokens, None)


class InstantReplica(Replica):  # (defined in __main__: Ray sends the class itself to the workers)
    def __init__(self, step_s: float, max_waiting: int, stream_interval: int):
        super().__init__(None, {"kv_cache_gb": 1.0, "max_num_batched_tokens": 4096, "async_scheduling": False},
                         max_waiting, stream_interval)
        self.engine.engine.runner = InstantRunner(step_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--workload", default="const:100:200")
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--stream-interval", type=int, default=1)
    a = p.parse_args()
    ray.init(num_cpus=a.replicas, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}})
    actors = [ray.remote(InstantReplica).options(num_cpus=1).remote(a.step_ms / 1000, 10**6, a.stream_interval)
              for _ in range(a.replicas)]
    router = Router(list(zip(actors, ray.get([r.info.remote() for r in actors]))), Metrics(), 10**6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(router, "m"), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    report = tempfile.NamedTemporaryFile(suffix=".json")
    cpu, wall = time.process_time(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "bench", "serve", "--url",
                    f"http://127.0.0.1:{port}", "--workload", a.workload, "--num-requests", str(a.num_requests),
                    "--vocab-size", "32000", "--output", report.name], check=True)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server.should_exit = True
    thread.join()
    r = json.load(report)["results"][0]
    print(f"front end: {cpu:.1f} CPU s over {wall:.1f} s ({100 * cpu / wall:.0f}% of a core): "
          f"{1e6 * cpu / r['total_output_tokens']:.0f} µs per streamed token, "
          f"{1e3 * cpu / r['completed']:.1f} ms per request")


if __name__ == "__main__":
    main()
