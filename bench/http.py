"""Throughput through the HTTP API server against the ZMQ client, on one engine, in one run; then
control-call latency over HTTP while streams run.

    python bench/http.py [--num-requests 32] [--rounds 3] [--calls 20]

The workload is `bench/throughput.py`'s (random ordinary-token prompts of 32-256 tokens, 32-128
new tokens, greedy, EOS ignored) on the model `python -m worker.model_loader` resolves, fp32 on
CPU, one engine with `--http-port`. Each round runs it through `AsyncClient`, then as streaming
`/v1/completions` from an asyncio HTTP client (httpx), every request at once; the two must give the
same tokens. Then `--calls` times each, one at a time while 32 streams generate: `GET /is_paused`,
and `POST /pause?mode=keep` then `POST /resume` (each timed), against the median decode step.
"""

import sys
from pathlib import Path

# This folder comes first on sys.path when a script here runs, and this file would shadow the
# standard library's `http` for every module: the repo root (for `bench.*`) takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import transformers  # noqa: E402

from bench.common import (  # noqa: E402
    WARMUP_PROMPT,
    WARMUP_TOKENS,
    RequestTiming,
    SystemResult,
    Workload,
    check_lengths,
    make_workload,
    number,
    percentile_ms,
    print_table,
    ratio,
    resolve_model_folder,
    running_engine,
    setup_logging,
    timing_from_arrivals,
)
from bench.throughput import stream_request  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402
from launch.local import free_port_range  # noqa: E402

logger = logging.getLogger("bench")

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32"]
COLUMNS = ["client", "out tok/s", "runs tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "vs zmq"]
WIDTHS = [10, 10, 20, 12, 11, 11, 8]
CONTROL_COLUMNS = ["HTTP call under load", "calls", "median ms", "p99 ms", "p99 / zmq ITL p50 (a step)"]
CONTROL_WIDTHS = [28, 7, 10, 10]


async def run_zmq(address: str, workload: Workload) -> SystemResult:
    async with AsyncClient(address) as client:
        await stream_request(client, WARMUP_PROMPT, WARMUP_TOKENS)
        start = time.perf_counter()
        timings = await asyncio.gather(*(stream_request(client, p, n)
                                         for p, n in zip(workload.prompts, workload.max_new_tokens)))  # fmt: skip
        return SystemResult("zmq", time.perf_counter() - start, timings)


async def http_request(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> RequestTiming:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}  # fmt: skip
    arrivals: list[float] = []
    token_ids: list[int] = []
    submitted = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
            now = time.perf_counter()
            arrivals.extend([now] * len(ids))
            token_ids.extend(ids)
    return timing_from_arrivals(submitted, arrivals, token_ids)


async def run_http(url: str, workload: Workload) -> SystemResult:
    limits = httpx.Limits(max_connections=len(workload.prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await http_request(http, WARMUP_PROMPT, WARMUP_TOKENS)
        start = time.perf_counter()
        timings = await asyncio.gather(*(http_request(http, p, n)
                                         for p, n in zip(workload.prompts, workload.max_new_tokens)))  # fmt: skip
        return SystemResult("http", time.perf_counter() - start, timings)


async def control_latency(url: str, address: str, workload: Workload, calls: int) -> dict[str, list[float]]:
    """Each call timed alone while 32 long streams run through the ZMQ client."""
    times: dict[str, list[float]] = {"GET /is_paused": [], "POST /pause?mode=keep": [], "POST /resume": []}
    async with AsyncClient(address) as client, httpx.AsyncClient(base_url=url, timeout=60) as http:
        streams = [asyncio.ensure_future(stream_request(client, p, 512)) for p in workload.prompts[:32]]
        await asyncio.sleep(2.0)
        for _ in range(calls):
            for name, method, path in (("GET /is_paused", "GET", "/is_paused"),
                                       ("POST /pause?mode=keep", "POST", "/pause?mode=keep"),
                                       ("POST /resume", "POST", "/resume")):  # fmt: skip
                start = time.perf_counter()
                response = await http.request(method, path)
                times[name].append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {response.status_code}")
            await asyncio.sleep(0.05)
        await client.abort_all()
        await asyncio.gather(*streams, return_exceptions=True)
    return times


def throughput_row(result: SystemResult, runs: list[SystemResult], reference: float) -> list[str]:
    return [result.name, number(result.tokens_per_s), " ".join(number(r.tokens_per_s) for r in runs),
            number(result.ttft_median_ms()), number(result.itl_ms(50)), number(result.itl_ms(99)),
            ratio(result.tokens_per_s, reference)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    folder = resolve_model_folder(None)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    workload = make_workload(args.num_requests, args.seed, (32, 256), (32, 128), vocab)
    port = free_port_range(1)
    url = f"http://127.0.0.1:{port}"
    runs: dict[str, list[SystemResult]] = {"zmq": [], "http": []}
    with running_engine(folder, ENGINE_ARGS + ["--http-port", str(port)]) as addresses:
        for _ in range(args.rounds):
            runs["zmq"].append(asyncio.run(run_zmq(addresses[0], workload)))
            runs["http"].append(asyncio.run(run_http(url, workload)))
        control = asyncio.run(control_latency(url, addresses[0], workload, args.calls))
    for name, results in runs.items():
        for result in results:
            check_lengths(name, workload, result.timings)
    same = all(a.token_ids == b.token_ids for a, b in zip(runs["zmq"][0].timings, runs["http"][0].timings))
    # The median round of each.
    best = {name: sorted(results, key=lambda r: r.tokens_per_s)[len(results) // 2] for name, results in runs.items()}
    reference = best["zmq"].tokens_per_s
    print_table(COLUMNS, WIDTHS, [throughput_row(best[n], runs[n], reference) for n in ("zmq", "http")])
    print(f"HTTP tokens equal the ZMQ client's: {same} ({len(workload.prompts)} requests)")
    step_ms = best["zmq"].itl_ms(50) or 0.0
    rows = [[name, str(len(t)), number(percentile_ms(t, 50), 2), number(percentile_ms(t, 99), 2),
             number(percentile_ms(t, 99) / step_ms, 2) if step_ms else "n/a"] for name, t in control.items()]
    print()
    print_table(CONTROL_COLUMNS, CONTROL_WIDTHS, rows)


if __name__ == "__main__":
    main()
