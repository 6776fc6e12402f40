"""Several API-server processes over one set of data-parallel replicas (`serve -dp N --api-server-count K`).

One Python process streams about 8,000 tokens a second (BENCHMARKS.md #12: its CPU per streamed token bounded two
H200 replicas to 1.66x one), so the HTTP work and the routing run in K processes, as vLLM's API-server scale-out
does. This process starts the replicas on Ray (as named actors) and then only supervises: each API server attaches
to the replicas by name, routes with a router of its own (its stream from each replica: dp_router.py, `front`),
and listens on the same host:port through SO_REUSEPORT, so that the kernel spreads the connections over them.
GET /metrics in any of them adds up all of theirs (each also serves its own on a loopback port). SIGTERM / SIGINT
go to every API server, which finishes its requests as `serve` does; the replicas stop when all have exited.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import uuid
from multiprocessing.connection import wait

import ray
from prometheus_client import start_http_server

from nanoflow.distributed.parallel_state import free_ports
from nanoflow.distributed.replica import launch_replicas
from nanoflow.entrypoints.dp_router import Router
from nanoflow.entrypoints.server import listen_socket, run_http, served_names


def serve_api_servers(args) -> int:
    from nanoflow.entrypoints.cli import engine_kwargs
    namespace = f"nanoflow-{uuid.uuid4().hex[:12]}"
    # (held to the end: Ray ends an actor, named or not, once its creator holds no handle to it)
    replicas = launch_replicas(args.model, engine_kwargs(args), args.data_parallel_size, args.ray_address,
                               args.max_waiting_requests, args.stream_interval, namespace)
    address = ray.get_runtime_context().gcs_address
    ports = free_ports(args.api_server_count)
    ctx = mp.get_context("spawn")  # (a fork would copy this driver's Ray threads)
    procs = [ctx.Process(target=_api_server, args=(args, k, address, namespace, ports), name=f"nanoflow-api-{k}")
             for k in range(args.api_server_count)]
    for p in procs:
        p.start()

    told = set()

    def stop(*_):  # once each: a second SIGTERM could come after one's Ray has reset its handler
        for p in procs:
            if p.pid not in told and p.is_alive():
                told.add(p.pid)
                os.kill(p.pid, signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    wait([p.sentinel for p in procs])  # the first to exit (a signal, or one that failed): all go
    stop()
    for p in procs:
        p.join()
    del replicas
    ray.shutdown()
    failed = [f"{p.name}: exit code {p.exitcode}" for p in procs if p.exitcode]
    if failed:
        print(f"nanoflow: API servers that did not exit cleanly: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _api_server(args, front: int, address: str, namespace: str, ports: list[int]) -> None:
    router = Router.attach(address, namespace, args.data_parallel_size, args.max_waiting_requests, front,
                           served_names(args)[0])
    router.metrics.peers = [f"http://127.0.0.1:{p}/metrics" for k, p in enumerate(ports) if k != front]
    start_http_server(ports[front], addr="127.0.0.1", registry=router.metrics.registry)  # its own, for the others
    run_http(router, args, listen_socket(args.host, args.port, reuse_port=True))

