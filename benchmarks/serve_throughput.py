"""Benchmark: ``sa-deploy serve``'s ``segment`` model under concurrent clients vs the Python API in
process, same model, same images, one run.

What is measured
    A Triton server (``serving.server.TritonServer``: the tritonserver binary, Python-backend
    ``segment`` model) is started on loopback for ``--model`` (default: the trained tiny CPnet
    fixture; pass an export directory or a cyto3-size model for realistic figures). ``--images``
    generated 512² uint16 cell images are sent as ``image_uint16`` over HTTP (binary tensors, one
    connection per client thread) by 1, 4 and 16 concurrent clients, ``--requests`` requests per
    concurrency level in all; each request's latency is timed from send to labels received.
    In-process reference: ``api.Segmenter.segment`` on the same images, one after another, in
    this process (same runtime and device). The server's labels are checked against the
    in-process labels for every image before timing.

Output
    One row per concurrency: requests/s, p50 and p95 latency (ms) through serve's HTTP front, and
    requests/s straight to Triton's own (loopback) port with the front's cost; then the in-process
    images/s; last line ``ratio=<server requests/s at 4 clients ÷ in-process images/s>``
    (the cost of serving: HTTP, copies, one model instance).

Run (repository root)::

    python benchmarks/serve_throughput.py                         # CPU, tiny CPnet (~1 min)
    python benchmarks/serve_throughput.py --model exports/cyto3 --device cuda --instances 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"


def images(n: int, size: int) -> list[np.ndarray]:
    from selfadapt_deploy.synthetic import random_labels, render

    return [(render(random_labels((size, size), size // 10, seed=k), seed=k) * 1000).astype(np.uint16)
            for k in range(n)]


def timed_requests(url: str, imgs: list[np.ndarray], clients: int, total: int) -> tuple[float, list[float]]:
    """Wall seconds for ``total`` requests spread over ``clients`` threads, and each latency."""
    from selfadapt_deploy.serving.client import TritonHTTPClient

    def worker(w: int) -> list[float]:
        client, latencies = TritonHTTPClient(url), []
        for i in range(w, total, clients):
            t = time.perf_counter()
            client.infer("segment", {"image_uint16": imgs[i % len(imgs)][..., None]}, ["labels"])
            latencies.append(time.perf_counter() - t)
        client.close()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(worker, range(clients)) for x in part]
    return time.perf_counter() - start, latencies


def main(argv: list[str] | None = None) -> int:
    from selfadapt_deploy.api import Segmenter
    from selfadapt_deploy.serving.client import TritonHTTPClient
    from selfadapt_deploy.serving.server import Ports, ServeSettings, TritonServer, free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--instances", type=int, default=1, help="copies of the segment model")
    args = ap.parse_args(argv)

    imgs = images(args.images, args.size)
    with Segmenter(args.model, runtime=args.runtime, device=args.device) as seg:
        print(f"model: {seg.description}; {args.images} images of {args.size}² px", flush=True)
        expected = [seg.segment(img) for img in imgs]  # also the warm-up
        start = time.perf_counter()
        for k in range(args.requests):
            seg.segment(imgs[k % len(imgs)])
        in_process = args.requests / (time.perf_counter() - start)
        spec = seg.runner.spec
    settings = ServeSettings(args.model, args.runtime, args.device, instances=args.instances)
    ports = Ports("127.0.0.1", free_port(), free_port(), free_port())
    rows = {}
    with TritonServer(settings, spec, ports) as server:
        client = TritonHTTPClient(server.url)
        for img, want in zip(imgs, expected, strict=True):  # correctness first, and the warm-up
            got = client.infer("segment", {"image_uint16": img[..., None]}, ["labels"])["labels"]
            if not np.array_equal(got, want):
                print("error: the server's labels differ from the in-process labels", file=sys.stderr)
                return 1
        client.close()
        direct_url = f"http://127.0.0.1:{server.triton_http}"  # Triton's own port, behind the front
        print(f"\n{'clients':>7} {'requests/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'direct req/s':>13} "
              f"{'front cost':>11}")
        for clients in (int(c) for c in args.clients.split(",")):
            wall, latencies = timed_requests(server.url, imgs, clients, args.requests)
            rows[clients] = args.requests / wall
            direct = args.requests / timed_requests(direct_url, imgs, clients, args.requests)[0]
            q = statistics.quantiles(latencies, n=20)
            print(f"{clients:>7} {rows[clients]:>11.2f} {statistics.median(latencies) * 1e3:>8.0f} "
                  f"{q[18] * 1e3:>8.0f} {direct:>13.2f} {direct / rows[clients] - 1:>10.1%}", flush=True)
    print(f"{'in-process':>7} {in_process:>11.2f}   (Segmenter.segment, one image at a time)")
    print(f"ratio={rows.get(4, float('nan')) / in_process:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
