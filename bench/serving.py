"""Serving benchmark: concurrent streaming requests against an OpenAI-compatible server.

    python bench/serving.py                       # launches `ktengine serve` on the demo model
    python bench/serving.py --url http://127.0.0.1:30000 --num-requests 200 --concurrency 64
    python bench/serving.py --request-rate 4      # Poisson arrivals, 4 requests/s on average

Requests follow a ShareGPT-like length mix (bench/workload.py; scaled by --scale), sent as
token-id prompts to /v1/completions with ignore_eos so each answer has its drawn length.
Reports request throughput, output tokens/s, time to first token and inter-token latency
percentiles, beside the limit they chase: one request alone on the same server, measured in
the same run (the single-stream decode rate and TTFT). Never asserts.

ITL is the gap between successive stream chunks; a chunk normally carries one token (the
server merges tokens only for a reader that falls behind).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from machine import describe
from workload import Request, sharegpt_like

from ktengine.client import APIError, AsyncClient


@dataclass
class Result:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    ttft: float | None = None  # s
    itls: list[float] = field(default_factory=list)  # s, one per chunk after the first
    latency: float = 0.0  # s, request sent -> last chunk


async def one_request(client: AsyncClient, model: str, req: Request) -> Result:
    res = Result(len(req.prompt), req.max_tokens)
    start = time.perf_counter()
    last = start
    try:
        async for delta in client.completions_stream(req.prompt, model=model,
                                                     max_tokens=req.max_tokens, temperature=1.0,
                                                     ignore_eos=True):
            now = time.perf_counter()
            if delta.usage is not None:
                res.output_tokens = delta.usage["completion_tokens"]
                continue
            if res.ttft is None:
                res.ttft = now - start
            else:
                res.itls.append(now - last)
            last = now
        res.ok = True
    except APIError as exc:
        res.error = str(exc)
    res.latency = last - start
    return res


async def run_workload(client: AsyncClient, model: str, requests: list[Request],
                       concurrency: int, rate: float, seed: int) -> tuple[list[Result], float]:
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def limited(req: Request) -> Result:
        async with sem:
            return await one_request(client, model, req)

    tasks = []
    start = time.perf_counter()
    for req in requests:
        tasks.append(asyncio.ensure_future(limited(req)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(v * scale for v in values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]

    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None], 1000),
        "itl_ms": percentiles([x for r in ok for x in r.itls], 1000),
        "e2e_s": percentiles([r.latency for r in ok]),
    }


async def single_stream(client: AsyncClient, model: str, vocab: int) -> dict:
    """The limit: one request alone, 32 prompt tokens, 64 generated."""
    req = Request([(17 * i) % (vocab - 3) + 3 for i in range(32)], 64)
    res = await one_request(client, model, req)
    decode = sum(res.itls)
    return {"ttft_ms": (res.ttft or 0) * 1000,
            "decode_tokens_per_s": len(res.itls) / decode if decode > 0 else None,
            "itl_ms": decode / len(res.itls) * 1000 if res.itls else None}


def launch_server(serve_args: list[str]) -> tuple[subprocess.Popen, str, Path]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(tempfile.mkdtemp(prefix="ktengine-bench-")) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ktengine", "serve", "--port", str(port),
                                 *serve_args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log_path
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    sys.exit(f"the server did not become healthy; log: {log_path}")


def _row(name: str, p: dict, unit: str) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (f"  {name:<6} {unit:<3} mean {f(p['mean']):>8}  p50 {f(p['p50']):>8}  "
            f"p90 {f(p['p90']):>8}  p99 {f(p['p99']):>8}")


async def main(args: argparse.Namespace) -> dict:
    async with AsyncClient(args.url, api_key=args.api_key, max_connections=args.concurrency + 2,
                           timeout=None, read_timeout=600) as client:
        cards = await client.models()
        model = args.model or cards[0]["id"]
        context = cards[0].get("max_model_len") or 4096
        requests = sharegpt_like(args.num_requests, args.vocab, groups=8, seed=args.seed,
                                 scale=args.scale, max_prompt=min(args.max_prompt, context // 2),
                                 max_output=min(args.max_output, context // 2))
        await one_request(client, model, Request([5, 6, 7, 8], 4))  # warm-up
        alone = await single_stream(client, model, args.vocab)
        results, duration = await run_workload(client, model, requests, args.concurrency,
                                               args.request_rate, args.seed)
    summary = summarize(results, duration)
    return {"model": model, "url": args.url, "single_stream": alone, "results": summary,
            "workload": {"num_requests": args.num_requests, "concurrency": args.concurrency,
                         "request_rate": None if args.request_rate == float("inf")
                         else args.request_rate, "scale": args.scale,
                         "mean_prompt": statistics.fmean(len(r.prompt) for r in requests),
                         "mean_output": statistics.fmean(r.max_tokens for r in requests)},
            "per_request": [asdict(r) | {"itls": None} for r in results] if args.per_request
            else None}


def report(out: dict, machine: dict) -> None:
    w, s, r = out["workload"], out["single_stream"], out["results"]
    rate = "all at once" if w["request_rate"] is None else \
        f"Poisson, {w['request_rate']:g} req/s"
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
          f"GPU {machine['gpu'] or 'none'}")
    print(f"server:  {out['url']}, model {out['model']}")
    print(f"workload: {w['num_requests']} requests, ShareGPT-like lengths x{w['scale']:g} "
          f"(mean prompt {w['mean_prompt']:.0f}, mean output {w['mean_output']:.0f} tokens), "
          f"concurrency {w['concurrency']}, arrivals {rate}")
    single = s["decode_tokens_per_s"]
    print(f"limit, one request alone: decode {single or 0:.1f} tokens/s "
          f"(ITL {s['itl_ms'] or 0:.1f} ms), TTFT {s['ttft_ms']:.1f} ms")
    print(f"results: {r['completed']} completed, {r['failed']} failed in {r['duration_s']:.1f} s")
    print(f"  request throughput {r['request_throughput']:.2f} req/s")
    ratio = f"  ({r['output_tokens_per_s'] / single:.1f}x one request alone)" if single else ""
    print(f"  output tokens/s    {r['output_tokens_per_s']:.1f}{ratio}")
    print(f"  total tokens/s     {r['total_tokens_per_s']:.1f} (prompt + output)")
    print(_row("TTFT", r["ttft_ms"], "ms"))
    print(_row("ITL", r["itl_ms"], "ms"))
    print(_row("E2E", r["e2e_s"], "s"))
    for e in r["errors"]:
        print(f"  error: {e}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: launch the demo model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrivals per second (Poisson); inf: all at once")
    p.add_argument("--scale", type=float, default=0.25, help="scales the ShareGPT-like lengths")
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `ktengine serve` flags when launching")
    p.add_argument("--per-request", action="store_true", help="keep per-request rows in the JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    args = p.parse_args()

    proc = None
    if args.url is None:
        proc, args.url, log_path = launch_server(args.serve_args.split())
        print(f"launched `ktengine serve` at {args.url} (log: {log_path})", file=sys.stderr)
    try:
        out = asyncio.run(main(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    machine = describe()
    result = {"benchmark": "serving", "machine": machine, **out}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        report(out, machine)


if __name__ == "__main__":
    cli()
