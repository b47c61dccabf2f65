"""Serving throughput: `omnicache-export serve` (PyTriton, step-level batching) with 1, 4 and 16
concurrent clients, each against sequential service through the same server.

    python tools/bench_serve.py OUT [--requests 32] [--rounds 3] [--max-batch 16] [--instances 8]

Starts one `serve` on OUT (loopback gRPC), checks one request bit for bit against the same request
sent alone, then for each concurrency c, in rounds interleaved (sequential, concurrent, sequential,
...): sequential service sends `--requests` requests one at a time from one client; concurrent
service sends the same requests from c client threads at once. Reports requests/s of each (median
over rounds) and their ratio. Every number is measured in this run. Stops the server with SIGTERM.

With --core, the same comparison on the serving core alone, in this process (`StepBatcher` over the
export's ONNX Runtime engines, no Triton): c requests submitted together and ticked to the end
against one at a time: the gain of step-level batching without the server's per-request cost.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_request(manifest, k: int) -> dict[str, np.ndarray]:
    """Request k: each conditioning input's row (class label k mod its table, zeros for floats), seed
    k; `uncond/<name>` only where the export stores no unconditional row."""
    from omnicache_export.runtime.manifest import load_uncond
    from omnicache_export.serving.requests import SEED, RequestContract

    contract = RequestContract(manifest, load_uncond(manifest))
    out = {}
    for spec in contract.inputs:
        if spec.optional:
            continue
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.name == SEED:
            out[spec.name] = np.array([k], np.int64)
        elif np.issubdtype(spec.dtype, np.integer):
            low, high = manifest.model_io.index_ranges.get(spec.name.removeprefix("uncond/"), (0, 1))
            out[spec.name] = np.full(shape, low + k % (high - low), spec.dtype)
        else:
            out[spec.name] = np.zeros(shape, spec.dtype)
    return out


def core_table(a) -> None:
    from omnicache_export.serving.batcher import StepBatcher

    batcher = StepBatcher.load(a.folder, max_batch=a.max_batch)
    try:
        requests = [make_request(batcher._owned.manifest, k) for k in range(a.requests)]  # noqa: SLF001

        def rate(c: int) -> float:
            t0 = time.perf_counter()
            for start in range(0, len(requests), c):
                futures = [batcher.submit(r) for r in requests[start:start + c]]
                batcher.run_until_idle()
                [f.result() for f in futures]
            return len(requests) / (time.perf_counter() - t0)

        rate(1)
        rate(max(map(int, a.clients.split(","))))  # warm-up
        print("serving core alone (StepBatcher in process, no Triton):")
        print("| requests together | one at a time req/s | together req/s | ratio |")
        print("|---:|---:|---:|---:|")
        for c in map(int, a.clients.split(",")):
            seq, con = [], []
            for _ in range(a.rounds):
                seq.append(rate(1))
                con.append(rate(c))
            s, q = statistics.median(seq), statistics.median(con)
            print(f"| {c} | {s:.2f} | {q:.2f} | {q / s:.2f}x |")
    finally:
        batcher.close()


class Client:
    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)

    def infer(self, arrays: dict) -> np.ndarray:
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, value in arrays.items():
            t = self.grpc.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            t.set_data_from_numpy(value)
            tensors.append(t)
        return self.client.infer("omnicache", tensors).as_numpy("latent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="an export folder")
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency (default 3)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--instances", type=int, default=None, help="serve --instances (default: serve's)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--core", action="store_true", help="also measure the serving core alone, in process")
    a = ap.parse_args()
    if a.core:
        core_table(a)

    from omnicache_export.runtime.manifest import read_manifest

    manifest = read_manifest(a.folder)
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "omnicache_export.cli", "serve", a.folder, "--http-port", str(http), "--grpc-port",
           str(grpc), "--metrics-port", str(metrics), "--max-batch", str(a.max_batch)]
    if a.instances:
        cmd += ["--instances", str(a.instances)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"localhost:{grpc}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if Client(url).client.is_model_ready("omnicache"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("serve did not come up")
            time.sleep(1)
        requests = [make_request(manifest, k) for k in range(a.requests)]
        clients = [Client(url) for _ in range(max(map(int, a.clients.split(","))))]
        first = clients[0].infer(requests[0])
        with ThreadPoolExecutor(len(clients)) as pool:  # warm-up, and the batched result equals the lone one
            batched = list(pool.map(lambda k: clients[k].infer(requests[k % a.requests]), range(len(clients))))
        assert np.array_equal(batched[0], first), "a batched request differs from the same request alone"

        def sequential() -> float:
            t0 = time.perf_counter()
            for r in requests:
                clients[0].infer(r)
            return len(requests) / (time.perf_counter() - t0)

        def concurrent(c: int) -> float:
            chunks = [requests[i::c] for i in range(c)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(lambda i: [clients[i].infer(r) for r in chunks[i]], range(c)))
            return len(requests) / (time.perf_counter() - t0)

        rows = []
        for c in map(int, a.clients.split(",")):
            seq, con = [], []
            for _ in range(a.rounds):
                seq.append(sequential())
                con.append(concurrent(c))
            s, q = statistics.median(seq), statistics.median(con)
            rows.append((c, s, q, q / s))
        steps = manifest.sampling.n_steps
        print(f"export: {a.folder} ({manifest.source.name}, {steps} steps, schedule "
              f"{''.join('F' if f else 'C' for f in manifest.schedule.full)}, "
              f"guidance {manifest.sampling.guidance_scale:g}); {a.requests} requests per measurement, "
              f"median of {a.rounds} interleaved rounds; CPU cores: {os.cpu_count()}")
        print("| clients | sequential req/s | concurrent req/s | ratio |")
        print("|---:|---:|---:|---:|")
        for c, s, q, r in rows:
            print(f"| {c} | {s:.2f} | {q:.2f} | {r:.2f}x |")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
