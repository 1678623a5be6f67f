"""Memory of a client that a server floods: an endless 200 body, an endless error body,
an endless SSE line.  The server runs in its own process; each client runs in a fresh
process, so that its peak RSS is its own.

Baseline: a plain aiohttp read of the same answer (``resp.read()``; for the stream, the
SSE loop this project had before: ``buffer += chunk`` until a newline), which holds
everything until the time limit.  Ours:
``TGIBackend`` with its default limits (16 MiB answers and stream lines, 8 KiB of an
error body).

    python bench/flood.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time

import aiohttp
from aiohttp import web

CASES = {
    "endless 200 body": ("/generate", 200, b'{"generated_text": "'),
    "endless error body": ("/generate", 500, b'{"error": "'),
    "endless SSE line": ("/generate_stream", 200, b"data: {"),
}


async def serve(port: int, case: str) -> None:
    async def flood(request: web.Request) -> web.StreamResponse:
        _, status, head = CASES[case]
        resp = web.StreamResponse(status=status)
        await resp.prepare(request)
        await resp.write(head)
        chunk = b"x" * 65536
        try:
            while True:
                await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            return resp

    app = web.Application()
    app.router.add_post("/generate", flood)
    app.router.add_post("/generate_stream", flood)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def client(kind: str, case: str, url: str, seconds: float) -> dict[str, object]:
    from ensemble_async.backends.tgi import TGIBackend
    from ensemble_async.errors import BackendError
    from ensemble_async.types import GenerationRequest

    path = CASES[case][0]
    target = f"{url}{path}"
    start = time.perf_counter()
    outcome = "no end"
    try:
        async with asyncio.timeout(seconds):
            if kind == "baseline":
                async with aiohttp.ClientSession() as s, s.post(target, json={}) as resp:
                    if path.endswith("stream"):  # the SSE loop this project had before
                        buffer = b""
                        async for chunk in resp.content.iter_any():
                            buffer += chunk
                            if buffer.find(b"\n") >= 0:
                                break
                    else:
                        await resp.read()
                outcome = "read whole"
            else:
                async with TGIBackend(url) as backend:
                    request = GenerationRequest(prompt="x")
                    if path.endswith("stream"):
                        async for _ in backend.stream(request):
                            pass
                    else:
                        await backend.generate(request)
    except TimeoutError:
        outcome = f"timeout after {seconds:.0f} s"
    except (BackendError, ValueError, aiohttp.ClientError) as exc:
        outcome = type(exc).__name__
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "s": time.perf_counter() - start, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "CASE"))
    parser.add_argument("--client", nargs=3, metavar=("KIND", "CASE", "URL"))
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), args.serve[1]))
        return
    if args.client:
        kind, case, url = args.client
        print(json.dumps(asyncio.run(client(kind, case, url, args.seconds))))
        return
    print("| case | baseline peak MiB | ours peak MiB | ratio | baseline | ours |")
    print("|---|---:|---:|---:|---|---|")
    for n, case in enumerate(CASES):
        port = 18931 + n
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), case],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            url = f"http://127.0.0.1:{port}"
            got = {}
            for kind in ("baseline", "ours"):
                command = [sys.executable, __file__, "--seconds", str(args.seconds)]
                out = subprocess.run(
                    [*command, "--client", kind, case, url],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait()
        base, ours = got["baseline"], got["ours"]
        ratio = float(str(base["peak_mb"])) / float(str(ours["peak_mb"]))
        print(
            f"| {case} | {base['peak_mb']:.0f} | {ours['peak_mb']:.0f} | {ratio:.1f}x | "
            f"{base['outcome']} ({base['s']:.1f} s) | {ours['outcome']} ({ours['s']:.2f} s) |"
        )


if __name__ == "__main__":
    main()
