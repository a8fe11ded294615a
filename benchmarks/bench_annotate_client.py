"""Requests/s of the `openai` annotation client against a local server that answers instantly.

Usage:
    python benchmarks/bench_annotate_client.py [--requests 2000] [--concurrency 1 8 32]

The server (aiohttp, 127.0.0.1, its own process so it does not share the client's CPU time
slice or GIL) answers every chat-completions request at once with a valid JSON list. The client
sends each request with two small PNGs (as the real stage does), validates the answer and
counts it. Shows whether the client adds a bottleneck (target: >= 200 requests/s at 32).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import socket
import time


def serve(port: int, ready: mp.synchronize.Event) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"choices": [{"message": {"content": '["a curved handle", "a lid"]'}}], "usage": {"completion_tokens": 9}}
        )

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", handle)
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=512, help="side of the two PNGs sent per request")
    args = parser.parse_args()

    from PIL import Image

    from know3d.annotation.base import PairRequest
    from know3d.annotation.config import AnnotateConfig
    from know3d.annotation.openai_backend import OpenAIAnnotator

    port = free_port()
    ready = mp.get_context("spawn").Event()
    server = mp.get_context("spawn").Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait(30)
    time.sleep(1.0)
    # a render-like image: an object with texture noise on a white background (~100 KB at 512^2)
    import numpy as np

    size = args.image_size
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2
    pixels = np.full((size, size, 4), 255, np.uint8)
    noise = np.random.default_rng(0).integers(0, 40, (size, size, 3))
    pixels[inside, :3] = (np.array([180, 90, 60]) + noise[inside]).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = buf.getvalue()
    try:
        print(f"# {args.requests} requests per setting, local server answering instantly, 2 x {len(png)} B PNG each")
        for concurrency in args.concurrency:
            cfg = AnnotateConfig(
                backend="openai", openai={"base_url": f"http://127.0.0.1:{port}/v1", "concurrency": concurrency}
            )
            annotator = OpenAIAnnotator(cfg)
            requests = [PairRequest(f"k{i}", png, png) for i in range(args.requests)]
            start = time.perf_counter()
            results = annotator.annotate(requests)
            elapsed = time.perf_counter() - start
            assert all(r["status"] == "ok" for r in results)
            print(
                f"concurrency {concurrency:>3}: {args.requests / elapsed:8.1f} requests/s "
                f"(max in flight {annotator.max_in_flight})"
            )
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
