"""Pause an engine with mode="keep" in the middle of a stream, resume it, and check the stream
only saw a delay.

    python examples/pause_resume.py [--address tcp://127.0.0.1:8100] [--max-tokens 64]

Without --address it starts an engine on the embedded model and stops it at the end. It prints one
line per check and exits with status 1 when one fails.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*` and `examples.*`

from bench.common import setup_logging  # noqa: E402
from examples.support import Checks, engine_addresses  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402

PROMPT = "Once upon a time"
MIN_GAP_SHARE = 0.9  # the stream's longest gap must cover this share of the pause


async def stream(client: AsyncClient, max_tokens: int, arrivals: list[float], pause_now: asyncio.Event,
                 pause_after: int) -> tuple[int, str | None]:
    """Records when each token arrives; asks for the pause once `pause_after` tokens arrived."""
    num_tokens, finish_reason = 0, None
    async for out in client.generate(prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        arrivals.extend([time.perf_counter()] * len(out.token_ids))
        if len(arrivals) >= pause_after:
            pause_now.set()
        num_tokens, finish_reason = out.num_output_tokens, out.finish_reason
    return num_tokens, finish_reason


async def pause_and_resume(client: AsyncClient, pause_now: asyncio.Event, pause_s: float, checks: Checks) -> None:
    await pause_now.wait()
    state = await client.pause(mode="keep")
    checks.check(state.state == "paused" and state.mode == "keep",
                 f"pause(mode='keep') answered state={state.state} mode={state.mode} num_frozen={state.num_frozen}")
    checks.check(await client.is_paused(), "is_paused() is true after the pause")
    await asyncio.sleep(pause_s)
    state = await client.resume()
    checks.check(state.state == "running", f"resume() answered state={state.state}")


async def run(address: str, args: argparse.Namespace, checks: Checks) -> None:
    arrivals: list[float] = []
    pause_now = asyncio.Event()
    async with AsyncClient(address) as client:
        controller = asyncio.create_task(pause_and_resume(client, pause_now, args.pause_seconds, checks))
        num_tokens, finish_reason = await stream(client, args.max_tokens, arrivals, pause_now, args.pause_after)
        if pause_now.is_set():
            await controller
        else:
            controller.cancel()
    checks.check(pause_now.is_set(), f"the pause came after {args.pause_after} tokens, before the stream ended")
    longest = max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0)
    checks.check(longest >= MIN_GAP_SHARE * args.pause_seconds,
                 f"longest gap between two tokens {longest:.2f} s >= {MIN_GAP_SHARE * args.pause_seconds:.2f} s")
    checks.check(num_tokens == args.max_tokens and len(arrivals) == args.max_tokens and finish_reason == "length",
                 f"the stream completed: {len(arrivals)} tokens received, num_output_tokens={num_tokens} "
                 f"of max_tokens={args.max_tokens}, finish_reason={finish_reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="a running engine's frontend (default: start one)")
    parser.add_argument("--model", default=None, help="for the engine started here (default: embedded SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pause-after", type=int, default=8, help="tokens received before the pause")
    parser.add_argument("--pause-seconds", type=float, default=3.0)
    args = parser.parse_args()
    if not 1 <= args.pause_after < args.max_tokens:
        parser.error("--pause-after must be at least 1 and below --max-tokens")
    setup_logging()
    checks = Checks()
    with engine_addresses([args.address] if args.address else [], 1, args.model) as addresses:
        asyncio.run(run(addresses[0], args, checks))
    sys.exit(checks.exit_code())


if __name__ == "__main__":
    main()
