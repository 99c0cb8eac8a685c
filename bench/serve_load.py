"""Load benchmark for `aigc serve`: aggregate tokens/s and time-to-first-token for N concurrent streaming chats.

Starts `aigc serve` as a subprocess (so the clients do not share its GIL), waits for /health, then for each
concurrency level runs that many streaming chat clients at once (`rounds` times), each asking for exactly
--max-tokens tokens (ignore_eos), and reports:

  aggregate tok/s = completion tokens of all clients / wall time of the level
  TTFT p50 / p95  = request sent -> first content chunk received, over all requests of the level

    python bench/serve_load.py                                  # SmolLM2, 1/8/32 clients, 64 tokens
    python bench/serve_load.py --clients 1 8 --max-tokens 32 --json out.json
    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct  # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is.", "Give three tips for learning Python.",
           "What is the capital of France and why is it famous?", "Describe a sunset in two sentences.",
           "List some uses of machine learning.", "Why is the sky blue?", "Tell me a fun fact about octopuses."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_chat(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, headers: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(c["delta"]["content"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "tokens": tokens, "total": time.perf_counter() - t0, "text": "".join(text)}


async def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int, headers: dict) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_chat(client, url, model, 0, 4, headers)  # warm-up
        t0 = time.perf_counter()
        results = []
        for r in range(rounds):
            results += await asyncio.gather(*(one_chat(client, url, model, r * clients + i, max_tokens, headers)
                                              for i in range(clients)))
        wall = time.perf_counter() - t0
    errors = [x["error"] for x in results if "error" in x]
    ok = [x for x in results if "error" not in x]
    ttfts = [x["ttft"] for x in ok if x["ttft"] is not None]
    tokens = sum(x["tokens"] for x in ok)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_sample": errors[:3],
            "wall_s": round(wall, 2), "completion_tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
            "per_stream_tok_s": round(statistics.mean(x["tokens"] / x["total"] for x in ok), 1) if ok else None,
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p95_s": round(percentile(ttfts, 0.95), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("AIGC_API_KEY"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=1, help="waves of requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    from aigckit.text.quant import QUANT_MODES

    ap.add_argument("--quantize", choices=QUANT_MODES, default=None, help="aigc serve --quantize")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    proc = None
    url = args.url
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "aigckit", "serve", "--model", args.model, "--port", str(port),
               "--log-level", "warning", "--max-batch", str(args.max_batch), "--max-queue", "256"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc is not None and proc.poll() is not None:
                raise SystemExit("server exited")
            if time.monotonic() > deadline:
                raise SystemExit("server did not become healthy")
            time.sleep(0.2)
        rows = []
        for c in args.clients:
            row = asyncio.run(run_level(url, args.model, c, args.rounds, args.max_tokens, headers))
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"\nmodel {args.model}, {args.max_tokens} tokens per request, cpus {os.cpu_count()}")
        print("| clients | requests | aggregate tok/s | per-stream tok/s | TTFT p50 (s) | TTFT p95 (s) | errors |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['clients']} | {r['requests']} | {r['aggregate_tok_s']} | {r['per_stream_tok_s']} | "
                  f"{r['ttft_p50_s']} | {r['ttft_p95_s']} | {r['errors']} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "max_tokens": args.max_tokens, "levels": rows}, f, indent=2)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
