"""Faults: a killed core, worker or launcher never leaves a hang or an orphan behind."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from frontend.client import AsyncClient, EngineDeadError
from tests.e2e.engine import start_engine

pytestmark = pytest.mark.timeout(300)

DEAD_WITHIN_S = 10.0


async def _open_streams_then_kill(address: str, kill) -> list[float]:
    """Start streams, kill a process once tokens flow; seconds until each stream raised."""
    async with AsyncClient(address) as client:
        started = asyncio.Event()

        async def stream() -> float:
            try:
                async for _ in client.generate(prompt="Tell me a long story", max_tokens=1500, ignore_eos=True,
                                               temperature=0.0):
                    started.set()
            except EngineDeadError:
                return time.monotonic()
            raise AssertionError("the stream ended without EngineDeadError")

        tasks = [asyncio.create_task(stream()) for _ in range(3)]
        await asyncio.wait_for(started.wait(), 60)
        killed_at = time.monotonic()
        kill()
        done = await asyncio.wait_for(asyncio.gather(*tasks), DEAD_WITHIN_S + 5)
        with pytest.raises(EngineDeadError):
            await client.get_state()
    return [t - killed_at for t in done]


@pytest.mark.parametrize("role", ["zeroserve-core", "zeroserve-worker-0"])
def test_sigkill_during_generation_fails_streams_and_stops_everything(role, tiny_models):
    engine = start_engine(tiny_models["llama"])
    try:
        victim = engine.child_pid(role)
        delays = asyncio.run(_open_streams_then_kill(engine.addresses[0], lambda: os.kill(victim, signal.SIGKILL)))
        assert max(delays) < DEAD_WITHIN_S
        assert engine.wait_exit(timeout=20) != 0
        assert engine.descendants() == []
    finally:
        engine.stop()


def test_sigkill_of_serve_leaves_no_process(tiny_models):
    engine = start_engine(tiny_models["qwen2"], frontends=2)
    try:
        assert len(engine.descendants()) == 4  # core, one worker, two frontends
        engine.process.kill()
        deadline = time.monotonic() + DEAD_WITHIN_S
        while engine.descendants() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.descendants() == []
    finally:
        engine.stop()


def _serve(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "serve", *options], capture_output=True, text=True,
                          timeout=120)


def test_bad_option_fails_with_one_clear_line():
    result = _serve("--block-size", "24")
    assert result.returncode == 2
    assert "--block-size must be a power of two, got 24" in result.stderr
    assert "Traceback" not in result.stderr


def test_unloadable_model_fails_cleanly(tmp_path):
    result = _serve("--model", str(tmp_path / "missing"), "--port", "8391")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "missing" in result.stderr


def test_heads_not_divisible_by_workers_is_refused(smollm2_folder):
    result = _serve("--model", str(smollm2_folder), "--workers", "2", "--port", "8393")
    assert result.returncode != 0
    assert "9 attention heads and 3 KV heads: --workers 2 must divide both" in result.stderr


def test_dead_frontend_has_its_requests_aborted_and_the_others_go_on(tiny_models):
    engine = start_engine(tiny_models["llama"], frontends=2)
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as doomed_client, AsyncClient(engine.addresses[1]) as client:
                start = await client.get_state()
                doomed = [asyncio.create_task(_drain(doomed_client, max_tokens=1500)) for _ in range(3)]
                survivor = asyncio.create_task(_drain(client, max_tokens=200))
                await _wait_for(lambda: _running(client), lambda n: n == 4)
                os.kill(engine.child_pid("zeroserve-frontend-0"), signal.SIGKILL)
                for task in doomed:
                    with pytest.raises(EngineDeadError):
                        await asyncio.wait_for(task, DEAD_WITHIN_S)
                await _wait_for(lambda: _running(client), lambda n: n == 1)
                outputs = await asyncio.wait_for(survivor, 60)
                await _wait_for(lambda: _running(client), lambda n: n == 0)
                return start, outputs, await client.get_state()
        start, outputs, end = asyncio.run(run())
        assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == 200
        assert end.num_free_blocks == start.num_free_blocks
        assert engine.process.poll() is None  # serve goes on with one frontend
    finally:
        engine.stop()


async def _drain(client: AsyncClient, max_tokens: int) -> list:
    return [o async for o in client.generate(prompt="Keep going", max_tokens=max_tokens, ignore_eos=True)]


async def _running(client: AsyncClient) -> int:
    return (await client.get_state()).num_running


async def _wait_for(probe, accept, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not accept(await probe()):
        assert time.monotonic() < deadline, "state not reached in time"
        await asyncio.sleep(0.05)
