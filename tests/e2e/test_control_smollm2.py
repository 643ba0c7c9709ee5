"""The control plane on the real SmolLM2, where timing and tokens are those of a real model:
pause(keep) gives transformers' greedy tokens, pause(abort) keeps partial outputs and frees every
block, pause(wait) drains; each pause is sent through the other frontend."""

import asyncio
import time

import pytest
import transformers

from frontend.client import AsyncClient
from tests.e2e.engine import start_engine
from tests.e2e.streams import Stream
from tests.reference import assert_matches_greedy, greedy_tokens, load_reference

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["The three primary colours are", "Write a haiku about the sea.", "def add(a, b):"]
KEEP_TOKENS = 32


@pytest.fixture(scope="module")
def engine(smollm2_folder):
    engine = start_engine(smollm2_folder, "--max-num-seqs", "8", frontends=2)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return transformers.AutoTokenizer.from_pretrained(smollm2_folder)


async def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def greedy(prompt_ids: list[int], request_id: str, max_tokens: int) -> dict:
    return dict(token_ids=prompt_ids, request_id=request_id, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_pause_keep_through_the_other_frontend_gives_transformers_tokens(engine, tokenizer, smollm2_folder):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]

    async def run():
        async with AsyncClient(engine.addresses[0]) as client, AsyncClient(engine.addresses[1]) as other:
            streams = [Stream(c, **greedy(p, f"keep-{i}", KEEP_TOKENS))
                       for i, (c, p) in enumerate(zip([client, other, client], prompts))]
            await _until(lambda: all(len(s.tokens) >= 4 for s in streams))
            state = await other.pause("keep")
            await asyncio.sleep(0.2)  # outputs sent before the pause may still be on their sockets
            counts = [len(s.tokens) for s in streams]
            await asyncio.sleep(1.0)
            frozen_counts = [len(s.tokens) for s in streams]
            await client.resume()
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 120)
            return state, counts, frozen_counts, streams

    state, counts, frozen_counts, streams = asyncio.run(run())
    assert state.state == "paused" and state.num_frozen == 3
    assert frozen_counts == counts  # nothing arrived while paused
    model = load_reference(smollm2_folder)
    for prompt, stream in zip(prompts, streams):
        assert stream.final.finish_reason == "length"
        assert_matches_greedy(model, prompt, stream.tokens, greedy_tokens(model, prompt, KEEP_TOKENS))
    assert all(max(b - a for a, b in zip(s.times, s.times[1:])) >= 1.0 for s in streams)


def test_pause_abort_keeps_partial_outputs_and_frees_every_block(engine, tokenizer):
    async def run():
        async with AsyncClient(engine.addresses[0]) as client, AsyncClient(engine.addresses[1]) as other:
            start = await client.get_state()
            streams = [Stream(client, **greedy(tokenizer(f"Story {i}:").input_ids, f"abort-{i}", 400))
                       for i in range(20)]
            await _until(lambda: sum(bool(s.outputs) for s in streams) >= 8)
            state = await other.pause("abort")
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 30)
            after = await client.get_state()
            held = Stream(client, **greedy(tokenizer("Held:").input_ids, "held", 4))
            await asyncio.sleep(0.5)
            num_held = (await other.get_state()).num_held
            await other.resume()
            await asyncio.wait_for(held.task, 60)
            return start, state, streams, after, held, num_held

    start, state, streams, after, held, num_held = asyncio.run(run())
    assert state.state == "paused" and state.mode == "abort"
    assert all(s.final.finish_reason == "abort" for s in streams)
    assert all(s.final.num_output_tokens == len(s.tokens) for s in streams)
    assert sum(len(s.tokens) > 0 for s in streams) >= 8 and any(not s.tokens for s in streams)
    assert after.num_free_blocks == start.num_free_blocks == start.num_total_blocks
    assert num_held == 1 and held.final.finish_reason == "length" and len(held.tokens) == 4


def test_pause_wait_through_the_other_frontend_returns_after_every_request_finished(engine, tokenizer):
    async def run():
        async with AsyncClient(engine.addresses[0]) as client, AsyncClient(engine.addresses[1]) as other:
            streams = [Stream(client, **greedy(tokenizer(p).input_ids, f"wait-{i}", 24)) for i, p in enumerate(PROMPTS)]
            await _until(lambda: all(s.outputs for s in streams))
            state = await other.pause("wait")
            # Their final outputs were sent before the pause answered; they come on another socket.
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 5)
            finished = [s.final.finish_reason for s in streams]
            await other.resume()
            return state, finished

    state, finished = asyncio.run(run())
    assert state.state == "paused" and state.num_running == 0
    assert finished == ["length"] * len(PROMPTS)
