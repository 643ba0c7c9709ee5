"""Pause through one frontend and check that the streams of both stop; resume through the other.

    python examples/multi_frontend.py [--address tcp://127.0.0.1:8100 --address tcp://127.0.0.1:8101]

Without --address it starts an engine with `--frontends 2` and stops it at the end. It streams
`--requests` requests through each frontend, calls `pause(mode="keep")` through frontend 1, checks
that no stream of either frontend receives a token while paused and that frontend 0 reports the
same state, resumes through frontend 0, and checks every stream completes. It prints one line per
check and exits with status 1 when one fails.
"""

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*` and `examples.*`

from bench.common import setup_logging  # noqa: E402
from examples.support import Checks, engine_addresses  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402

PROMPT = "The three most useful things to know about rivers are"
# Outputs the core sent before the pause may still be in flight on the other frontend's socket.
IN_FLIGHT_GRACE_S = 0.3
STREAMING_TIMEOUT_S = 120.0
STALL_TIMEOUT_S = 30.0  # no stream received a token for this long: the engine stalled


@dataclass
class Stream:
    frontend: int
    num_tokens: int = 0
    finish_reason: str | None = None


async def consume(client: AsyncClient, stream: Stream, max_tokens: int) -> None:
    async for out in client.generate(prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        stream.num_tokens += len(out.token_ids)
        stream.finish_reason = out.finish_reason


async def wait_until_streaming(streams: list[Stream], min_tokens: int) -> None:
    async def poll() -> None:
        while any(s.num_tokens < min_tokens for s in streams):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), STREAMING_TIMEOUT_S)


async def wait_finished(tasks: list["asyncio.Task[None]"], streams: list[Stream]) -> bool:
    """True once every stream ended; False when no stream received a token for STALL_TIMEOUT_S."""
    seen, progressed = -1, time.monotonic()
    while not all(task.done() for task in tasks):
        if (total := sum(s.num_tokens for s in streams)) != seen:
            seen, progressed = total, time.monotonic()
        elif time.monotonic() - progressed > STALL_TIMEOUT_S:
            return False
        await asyncio.sleep(0.1)
    return True


def counts(streams: list[Stream], frontend: int) -> list[int]:
    return [s.num_tokens for s in streams if s.frontend == frontend]


async def check_frozen(clients: list[AsyncClient], streams: list[Stream], args: argparse.Namespace,
                       checks: Checks) -> None:
    state = await clients[1].pause(mode="keep")
    checks.check(state.state == "paused" and state.mode == "keep",
                 f"pause(mode='keep') through frontend 1 answered state={state.state} mode={state.mode}")
    await asyncio.sleep(IN_FLIGHT_GRACE_S)
    before = [counts(streams, f) for f in (0, 1)]
    checks.check(all(s.finish_reason is None for s in streams), "no stream had finished when the pause held")
    await asyncio.sleep(args.hold_seconds)
    for frontend in (0, 1):
        after = counts(streams, frontend)
        checks.check(after == before[frontend], f"frontend {frontend}'s streams received no token in "
                     f"{args.hold_seconds:.1f} s of pause (tokens per stream {before[frontend]} -> {after})")
    other = await clients[0].get_state()
    checks.check(other.state == "paused" and other.num_frozen == len(streams),
                 f"frontend 0 reports state={other.state} num_frozen={other.num_frozen} "
                 f"of {len(streams)} requests")
    state = await clients[0].resume()
    checks.check(state.state == "running", f"resume() through frontend 0 answered state={state.state}")


async def run(addresses: list[str], args: argparse.Namespace, checks: Checks) -> None:
    streams = [Stream(frontend) for frontend in (0, 1) for _ in range(args.requests)]
    async with AsyncClient(addresses[0]) as first, AsyncClient(addresses[1]) as second:
        clients = [first, second]
        tasks = [asyncio.create_task(consume(clients[s.frontend], s, args.max_tokens)) for s in streams]
        await wait_until_streaming(streams, args.pause_after)
        await check_frozen(clients, streams, args, checks)
        finished = await wait_finished(tasks, streams)
        checks.check(finished, f"the streams made progress after resume (no {STALL_TIMEOUT_S:.0f} s without a token)")
        for task in tasks:
            if finished:
                task.result()  # a stream that failed raises here
            else:
                task.cancel()
    for frontend in (0, 1):
        done = [s for s in streams if s.frontend == frontend]
        checks.check(all(s.num_tokens == args.max_tokens and s.finish_reason == "length" for s in done),
                     f"frontend {frontend}'s streams completed: tokens {[s.num_tokens for s in done]} of "
                     f"{args.max_tokens}, finish reasons {sorted({str(s.finish_reason) for s in done})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", action="append", default=[],
                        help="frontend 0's, then frontend 1's address of a running engine (default: start one)")
    parser.add_argument("--model", default=None, help="for the engine started here (default: embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=2, help="streams per frontend")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pause-after", type=int, default=4, help="tokens every stream received before the pause")
    parser.add_argument("--hold-seconds", type=float, default=1.5, help="how long the paused streams are watched")
    args = parser.parse_args()
    if args.requests < 1 or not 1 <= args.pause_after < args.max_tokens:
        parser.error("--requests must be at least 1, and --pause-after at least 1 and below --max-tokens")
    setup_logging()
    checks = Checks()
    with engine_addresses(args.address, 2, args.model) as addresses:
        asyncio.run(run(addresses, args, checks))
    sys.exit(checks.exit_code())


if __name__ == "__main__":
    main()
