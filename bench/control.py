"""Latency of the control calls while the engine is busy, against the decode step it interrupts.

    python bench/control.py [--streams 32] [--calls 100] [--max-tokens 512] [--engine-arg=--block-size=32]

(from any folder; `python -m bench.control` from the repo root works too.)

The engine serves the model `python -m worker.model_loader` resolves, in fp32 on CPU. `--streams`
greedy requests (random ordinary-token prompts of 32-128 tokens, `--max-tokens`/2 to `--max-tokens`
new tokens, EOS ignored) generate throughout; one that finishes is replaced at once, so that the
batch stays full. Meanwhile, one call at a time, with a random spacing of up to `--spacing`
seconds so that calls land anywhere in a step:

* `ping()`;
* `pause(mode="keep")`, then `resume()` (each timed on its own);
* `abort([id])` of a fresh request, timed from the call once its first token arrived.

The decode step is the gap between consecutive outputs of one request, pooled over all requests
(an output carrying k tokens counts as k gaps of 1/k of it), leaving out every gap that overlaps a
pause (from the pause call until resume returned). It prints one table.
"""

import sys
from pathlib import Path

# This folder comes first on sys.path when a script here runs, and its http.py would shadow the
# standard library's `http` for every module: the repo root (for `bench.*`) takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import bisect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
import transformers

from bench.common import (  # noqa: E402
    WARMUP_PROMPT,
    WARMUP_TOKENS,
    Workload,
    make_workload,
    number,
    percentile_ms,
    print_table,
    resolve_model_folder,
    running_engine,
    setup_logging,
)
from frontend.client import AsyncClient, RequestOutput  # noqa: E402

logger = logging.getLogger("bench")

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32"]
PROMPT_LEN = (32, 128)
FIRST_TOKEN_TIMEOUT_S = 60.0
T = TypeVar("T")
COLUMNS = ["operation", "calls", "median ms", "p99 ms", "p99 / median decode step"]
WIDTHS = [26, 7, 10, 10]


@dataclass
class Traffic:
    """Arrival times of every background request's outputs, and the windows in which a pause held."""

    arrivals: list[list[tuple[float, int]]] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)

    def decode_gaps(self) -> list[float]:
        gaps = []
        for outputs in self.arrivals:
            for (before, _), (after, count) in zip(outputs, outputs[1:]):
                if count and not self._paused_between(before, after):
                    gaps.extend([(after - before) / count] * count)
        return gaps

    def _paused_between(self, before: float, after: float) -> bool:
        # Pauses come one at a time, so the windows are sorted by their end as well as their start.
        first_ending_later = bisect.bisect_right(self.pauses, before, key=lambda window: window[1])
        return first_ending_later < len(self.pauses) and self.pauses[first_ending_later][0] < after


@dataclass(frozen=True)
class OpTiming:
    name: str
    durations_s: list[float]


@dataclass(frozen=True)
class Spacing:
    """Random pauses of up to `most_s` between timed calls, so that calls land anywhere in a step."""

    rng: np.random.Generator
    most_s: float

    def next(self) -> float:
        return float(self.rng.uniform(0.0, self.most_s))


# ---- background load ------------------------------------------------------------------------


async def keep_generating(client: AsyncClient, slot: int, prompt: list[int], max_tokens: int,
                          traffic: Traffic) -> None:
    """Runs until cancelled (which cancels the request in flight); restarts its request when it ends."""
    for generation in itertools.count():
        outputs: list[tuple[float, int]] = []
        traffic.arrivals.append(outputs)
        stream = client.generate(token_ids=prompt, request_id=f"load-{slot}-{generation}", max_tokens=max_tokens,
                                 temperature=0.0, ignore_eos=True)
        async for out in stream:
            outputs.append((time.perf_counter(), len(out.token_ids)))
            if out.finish_reason not in (None, "length"):
                raise RuntimeError(f"background request {out.request_id} ended with {out.finish_reason}: {out.error}")


async def wait_all_streaming(traffic: Traffic, num_streams: int) -> None:
    deadline = time.monotonic() + FIRST_TOKEN_TIMEOUT_S
    while sum(1 for outputs in traffic.arrivals if outputs) < num_streams:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {num_streams} background requests streamed within {FIRST_TOKEN_TIMEOUT_S} s")
        await asyncio.sleep(0.05)


def check_load(tasks: list["asyncio.Task[None]"]) -> None:
    """A background request that failed fails the benchmark: the calls would not be timed under load."""
    for task in tasks:
        if task.done():
            task.result()


# ---- timed calls ----------------------------------------------------------------------------


async def repeat(calls: int, spacing: Spacing, call: Callable[[], Awaitable[T]],
                 load: list["asyncio.Task[None]"]) -> list[T]:
    results = []
    for _ in range(calls):
        await asyncio.sleep(spacing.next())
        results.append(await call())
        check_load(load)
    return results


async def timed_ping(client: AsyncClient) -> float:
    start = time.perf_counter()
    await client.ping()
    return time.perf_counter() - start


async def timed_pause_resume(client: AsyncClient, traffic: Traffic) -> tuple[float, float]:
    start = time.perf_counter()
    state = await client.pause(mode="keep")
    paused = time.perf_counter()
    if state.state != "paused" or state.mode != "keep":
        raise RuntimeError(f"pause(mode='keep') returned {state}")
    await client.resume()
    resumed = time.perf_counter()
    traffic.pauses.append((start, resumed))
    return paused - start, resumed - paused


async def timed_abort(client: AsyncClient, request_id: str, prompt: list[int], max_tokens: int) -> float:
    first_token = asyncio.Event()
    probe = asyncio.create_task(probe_request(client, request_id, prompt, max_tokens, first_token))
    await asyncio.wait_for(first_token.wait(), FIRST_TOKEN_TIMEOUT_S)
    start = time.perf_counter()
    result = await client.abort([request_id])
    elapsed = time.perf_counter() - start
    finish_reason = await asyncio.wait_for(probe, FIRST_TOKEN_TIMEOUT_S)
    if result.aborted != [request_id] or finish_reason != "abort":
        raise RuntimeError(f"abort([{request_id!r}]) returned {result}; the request ended with {finish_reason}")
    return elapsed


async def probe_request(client: AsyncClient, request_id: str, prompt: list[int], max_tokens: int,
                        first_token: asyncio.Event) -> str | None:
    finish_reason = None
    async for out in client.generate(token_ids=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=0.0, ignore_eos=True):
        if out.token_ids:
            first_token.set()
        finish_reason = out.finish_reason
    return finish_reason


# ---- the run --------------------------------------------------------------------------------


async def measure(address: str, workload: Workload, args: argparse.Namespace) -> tuple[list[OpTiming], Traffic]:
    traffic = Traffic()
    async with AsyncClient(address) as client:
        await drain(client.generate(token_ids=WARMUP_PROMPT, max_tokens=WARMUP_TOKENS, ignore_eos=True))
        background = zip(workload.prompts[:args.streams], workload.max_new_tokens)
        load = [asyncio.create_task(keep_generating(client, slot, prompt, max_tokens, traffic))
                for slot, (prompt, max_tokens) in enumerate(background)]
        try:
            await wait_all_streaming(traffic, args.streams)
            logger.info("%d requests streaming; timing %d calls of each operation", args.streams, args.calls)
            timings = await time_operations(client, workload.prompts[-1], traffic, load, args)
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
    return timings, traffic


async def time_operations(client: AsyncClient, probe_prompt: list[int], traffic: Traffic,
                          load: list["asyncio.Task[None]"], args: argparse.Namespace) -> list[OpTiming]:
    spacing = Spacing(np.random.default_rng(args.seed), args.spacing)
    pings = await repeat(args.calls, spacing, lambda: timed_ping(client), load)
    logger.info("ping() timed")
    pairs = await repeat(args.calls, spacing, lambda: timed_pause_resume(client, traffic), load)
    logger.info("pause/resume timed")
    probe_ids = (f"probe-{i}" for i in range(args.calls))
    aborts = await repeat(args.calls, spacing,
                          lambda: timed_abort(client, next(probe_ids), probe_prompt, args.max_tokens), load)
    logger.info("abort([id]) timed")
    return [OpTiming("ping()", pings), OpTiming('pause(mode="keep")', [p for p, _ in pairs]),
            OpTiming("resume()", [r for _, r in pairs]), OpTiming("abort([id])", aborts)]


async def drain(stream: AsyncIterator[RequestOutput]) -> None:
    async for _ in stream:
        pass


def report(timings: list[OpTiming], gaps: list[float]) -> None:
    step_ms = percentile_ms(gaps, 50)
    rows = [["decode step (token gap)", str(len(gaps)), number(step_ms, 2), number(percentile_ms(gaps, 99), 2), "-"]]
    for timing in timings:
        p99 = percentile_ms(timing.durations_s, 99)
        rows.append([timing.name, str(len(timing.durations_s)), number(percentile_ms(timing.durations_s, 50), 2),
                     number(p99, 2), "n/a" if p99 is None or not step_ms else f"{p99 / step_ms:.2f}"])
    print_table(COLUMNS, WIDTHS, rows)
    print("target: p99 of each operation below one decode step (last column < 1); "
          "decode step = median token gap while no pause was in force")


def run(args: argparse.Namespace) -> None:
    folder = resolve_model_folder(args.model)
    vocab_size = transformers.AutoConfig.from_pretrained(folder).vocab_size
    # Lengths from max/2 to max: requests restart at different times, not all in one long prefill step.
    workload = make_workload(args.streams + 1, args.seed, PROMPT_LEN, (args.max_tokens // 2, args.max_tokens),
                             vocab_size)
    with running_engine(folder, ENGINE_ARGS + args.engine_arg) as addresses:
        timings, traffic = asyncio.run(measure(addresses[0], workload, args))
    report(timings, traffic.decode_gaps())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="passed to worker.model_loader (default: embedded SmolLM2)")
    parser.add_argument("--streams", type=int, default=32, help="background requests kept generating")
    parser.add_argument("--calls", type=int, default=100, help="timed calls of each operation")
    parser.add_argument("--max-tokens", type=int, default=512, help="most new tokens of a background request; those of an aborted one")
    parser.add_argument("--spacing", type=float, default=0.1, help="most seconds between two timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-arg", action="append", default=[],
                        help="extra `serve` option, repeatable: --engine-arg=--max-num-seqs=128")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.streams < 1 or args.calls < 1 or args.max_tokens < 2 or args.spacing < 0:
        parser.error("--streams and --calls must be at least 1, --max-tokens at least 2, --spacing not negative")
    setup_logging()
    run(args)


if __name__ == "__main__":
    main()
