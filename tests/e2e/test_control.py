"""Pause (abort / wait / keep), resume, abort by id and state, from either of two frontends."""

import asyncio
import time

import pytest
import transformers

from frontend.client import AsyncClient, EnginePausedError
from tests.e2e.engine import start_engine
from tests.e2e.streams import Stream
from tests.reference import greedy_tokens, load_reference

pytestmark = pytest.mark.timeout(300)


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def long_request(i: int, max_tokens: int = 400) -> dict:
    return dict(prompt=f"Story {i}:", request_id=f"req-{i}", max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


def test_pause_abort_ends_running_with_partial_tokens_and_waiting_with_none(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client, AsyncClient(control_engine.addresses[1]) as other:
            start = await client.get_state()
            streams = [Stream(client, **long_request(i)) for i in range(20)]
            await _until(lambda: sum(bool(s.outputs) for s in streams) >= 8)
            state = await other.pause("abort")  # through the other frontend
            assert state.state == "paused" and state.mode == "abort"
            # The pause returned: every stream of this client already got its final output? Its
            # frontend is another one, so give the outputs a moment on their own socket.
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 10)
            assert await client.is_paused()
            after = await client.get_state()
            held = Stream(client, **long_request(99, max_tokens=5))
            await asyncio.sleep(0.5)
            assert held.outputs == [] and (await client.get_state()).num_held == 1
            await client.resume()
            await asyncio.wait_for(held.task, 30)
            return start, streams, after, held
    start, streams, after, held = asyncio.run(run())
    finals = [s.final for s in streams]
    assert all(f.finish_reason == "abort" for f in finals)
    assert all(s.final.num_output_tokens == len(s.tokens) for s in streams)
    assert sum(len(s.tokens) > 0 for s in streams) >= 8
    assert any(len(s.tokens) == 0 for s in streams)  # waiting ones never produced a token
    assert after.num_free_blocks == start.num_free_blocks
    assert held.final.finish_reason == "length" and len(held.tokens) == 5


def test_pause_keep_freezes_streams_and_resume_gives_the_same_tokens(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client, AsyncClient(control_engine.addresses[1]) as other:
            reference = Stream(client, **long_request(1, max_tokens=60))
            await reference.task
            paused = Stream(client, **long_request(1, max_tokens=60))
            await _until(lambda: len(paused.tokens) >= 10)
            state = await other.pause("keep")
            assert state.state == "paused" and state.num_frozen == 1
            # Outputs the core sent before pausing may still be on the first frontend's socket.
            await asyncio.sleep(0.2)
            count = len(paused.tokens)
            await asyncio.sleep(1.0)
            frozen_count = len(paused.tokens)
            resumed_at = time.monotonic()
            await other.resume()
            await asyncio.wait_for(paused.task, 30)
            return reference, paused, count, frozen_count, resumed_at
    reference, paused, count, frozen_count, resumed_at = asyncio.run(run())
    assert frozen_count == count  # nothing arrived while paused
    assert paused.tokens == reference.tokens and paused.final.finish_reason == "length"
    assert max(b - a for a, b in zip(paused.times, paused.times[1:])) >= 0.9


def test_pause_wait_returns_after_running_requests_finish(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[1]) as client:
            streams = [Stream(client, **long_request(i, max_tokens=30)) for i in range(3)]
            await _until(lambda: all(s.outputs for s in streams))
            state = await client.pause("wait")
            finished = [s.outputs[-1].finish_reason for s in streams]
            await client.resume()
            return state, finished
    state, finished = asyncio.run(run())
    assert state.state == "paused" and state.num_running == 0
    assert finished == ["length"] * 3


def test_resume_cancels_a_pending_pause_wait(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client, AsyncClient(control_engine.addresses[1]) as other:
            stream = Stream(client, **long_request(5, max_tokens=300))
            await _until(lambda: stream.outputs)
            pending = asyncio.create_task(client.pause("wait"))
            await asyncio.sleep(0.2)
            await other.resume()
            with pytest.raises(Exception, match="cancelled by resume"):
                await asyncio.wait_for(pending, 10)
            result = await client.abort(["req-5", "nobody"])
            await asyncio.wait_for(stream.task, 10)
            return result, stream
    result, stream = asyncio.run(run())
    assert result.aborted == ["req-5"] and result.not_found == ["nobody"]
    assert stream.final.finish_reason == "abort"


def test_abort_by_user_id_from_another_frontend_and_abort_all(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client, AsyncClient(control_engine.addresses[1]) as other:
            twins = [Stream(client, **long_request(7)) for _ in range(2)]
            single = Stream(other, **long_request(8))
            await _until(lambda: all(s.outputs for s in twins + [single]))
            result = await other.abort(["req-7"])
            await asyncio.wait_for(asyncio.gather(*(s.task for s in twins)), 10)
            everything = await client.abort_all()
            await asyncio.wait_for(single.task, 10)
            state = await client.get_state()
            return result, twins, everything, single, state
    result, twins, everything, single, state = asyncio.run(run())
    assert result.aborted == ["req-7"] and result.not_found == []
    assert all(t.final.finish_reason == "abort" for t in twins)
    assert everything.aborted == ["req-8"] and single.final.finish_reason == "abort"
    assert state.num_running == 0 and state.num_free_blocks == state.num_total_blocks


def test_requests_while_paused_are_rejected_with_the_reject_policy(tiny_models):
    engine = start_engine(tiny_models["qwen2"], "--paused-requests", "reject")
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client:
                await client.pause("keep")
                with pytest.raises(EnginePausedError):
                    async for _ in client.generate(prompt="hi", max_tokens=3):
                        pass
                await client.resume()
                return [o async for o in client.generate(prompt="hi", max_tokens=3, ignore_eos=True)]
        outputs = asyncio.run(run())
    finally:
        engine.stop()
    assert outputs[-1].finish_reason == "length"


def test_pause_wait_completes_when_its_last_request_is_aborted(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client:
            stream = Stream(client, **long_request(11, max_tokens=2000))
            await _until(lambda: stream.outputs)
            pending = asyncio.create_task(client.pause("wait"))
            await asyncio.sleep(0.2)
            assert not pending.done()
            await client.abort(["req-11"])
            state = await asyncio.wait_for(pending, 10)
            await client.resume()
            return state, stream
    state, stream = asyncio.run(run())
    assert state.state == "paused" and stream.final.finish_reason == "abort"


def test_pause_keep_freezes_a_long_chunked_prefill(tiny_models):
    """An 8-token budget prefills the long prompt over many steps; a pause in the middle holds it."""
    engine = start_engine(tiny_models["qwen3"], "--max-num-batched-tokens", "8")
    prompt = "The harbour town kept its lighthouse lit through every storm of the century. " * 12
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client:
                paused = Stream(client, prompt=prompt, max_tokens=8, ignore_eos=True, temperature=0.0)
                while (await client.get_state()).num_running == 0:
                    await asyncio.sleep(0.001)
                state = await client.pause("keep")
                await asyncio.sleep(0.5)
                during = (len(paused.outputs), await client.get_state())
                await client.resume()
                await asyncio.wait_for(paused.task, 30)
                return paused, state, during
        paused, state, (outputs_while_paused, later) = asyncio.run(run())
    finally:
        engine.stop()
    assert state.state == "paused" and state.num_frozen == 1
    assert outputs_while_paused == 0 and later.num_frozen == 1
    model = load_reference(tiny_models["qwen3"])
    prompt_ids = transformers.AutoTokenizer.from_pretrained(tiny_models["qwen3"])(prompt).input_ids
    assert len(prompt_ids) > 20 * 8
    assert paused.tokens == greedy_tokens(model, prompt_ids, 8) and paused.final.finish_reason == "length"


def test_a_request_without_an_id_is_aborted_by_the_id_its_outputs_show(control_engine):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client:
            stream = Stream(client, prompt="Anonymous", max_tokens=2000, ignore_eos=True)
            await _until(lambda: stream.outputs)
            result = await client.abort([stream.outputs[0].request_id])
            await asyncio.wait_for(stream.task, 10)
            return result, stream
    result, stream = asyncio.run(run())
    assert result.aborted == [stream.outputs[0].request_id] and stream.final.finish_reason == "abort"
