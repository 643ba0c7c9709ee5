"""The frontend as a process, in front of a fake core, driven through AsyncClient and Client."""

import asyncio
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from protocol.codec import Decoder, Encoder
from protocol.messages import EngineState, FrontendMessage, StreamError

from frontend.client import AsyncClient, Client, EngineDeadError, InvalidRequestError, UtilityError
from frontend.tokenizer import Tokenizer
from tests.frontend.conftest import Engine
from tests.frontend.fake_core import MAX_MODEL_LEN


async def _collect(client: AsyncClient, **kwargs) -> list:
    return [out async for out in client.generate(**kwargs)]


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_ready_report_reaches_launch(engine: Engine) -> None:
    if engine.ready is None:
        pytest.xfail("protocol.process.report_to_launch closes with linger 0 and can drop the report")
    assert engine.ready.role == "frontend-0" and engine.ready.detail == engine.address
    assert engine.ready.error is None


async def test_stream_echo(engine: Engine, tokenizer: Tokenizer) -> None:
    prompt = "Hello world 😀 café"
    ids = tokenizer.encode_prompt(prompt)
    async with AsyncClient(engine.address) as client:
        outs = await _collect(client, prompt=prompt, request_id="r1", max_tokens=50, temperature=0.0)
    assert "".join(o.text for o in outs) == tokenizer.decode(ids)
    assert [t for o in outs for t in o.token_ids] == ids
    assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + ["length"]
    assert all(o.request_id == "r1" and o.num_prompt_tokens == len(ids) for o in outs)
    assert outs[-1].num_output_tokens == len(ids)


async def test_concurrent_streams(engine: Engine, tokenizer: Tokenizer) -> None:
    prompts = [f"stream number {i} says 你好" for i in range(8)]
    async with AsyncClient(engine.address) as client:
        results = await asyncio.gather(*(_collect(client, prompt=p, max_tokens=40) for p in prompts))
    for prompt, outs in zip(prompts, results):
        assert "".join(o.text for o in outs) == prompt
        assert sum(o.finished for o in outs) == 1


async def test_break_cancels_at_the_core(engine: Engine) -> None:
    async with AsyncClient(engine.address) as client:
        async for out in client.generate(token_ids=[100, 200, 300], request_id="slow-1"):
            if out.num_output_tokens >= 3:
                break
        internal = engine.core.added()[-1].request_id
        assert await asyncio.to_thread(_wait_until, lambda: internal in engine.core.aborted_ids())
        assert await client.call("echo", 1) == 1  # the client still works after a cancel


def test_sync_client(engine: Engine, tokenizer: Tokenizer) -> None:
    with Client(engine.address) as client:
        outs = list(client.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=60))
        assert "".join(o.text for o in outs) == tokenizer.decode(tokenizer.encode_chat([{"role": "user", "content": "hi"}]))
        for out in client.generate(token_ids=[1, 2, 3], request_id="slow-2"):
            break
        internal = engine.core.added()[-1].request_id
        assert _wait_until(lambda: internal in engine.core.aborted_ids())
        assert client.call("echo", {"x": 1}) == {"x": 1}


async def test_stop_string_ends_stream_and_aborts_core(engine: Engine) -> None:
    async with AsyncClient(engine.address) as client:
        outs = await _collect(client, prompt="The answer is forty-two, said the computer.", max_tokens=60, stop=["forty-two"])
    assert "".join(o.text for o in outs) == "The answer is "
    assert outs[-1].finish_reason == "stop"
    internal = engine.core.added()[-1].request_id
    assert await asyncio.to_thread(_wait_until, lambda: internal in engine.core.aborted_ids())


async def test_utility_calls(engine: Engine) -> None:
    async with AsyncClient(engine.address) as client:
        assert await client.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        state = await client.get_state()
        assert isinstance(state, EngineState) and state.num_total_blocks == 100
        with pytest.raises(UtilityError, match="unknown method"):
            await client.call("no_such_method")
        with pytest.raises(TimeoutError):
            await client.call("hang", timeout=0.3)


async def test_invalid_requests(engine: Engine, tokenizer: Tokenizer) -> None:
    added = len(engine.core.added())
    async with AsyncClient(engine.address) as client:
        with pytest.raises(InvalidRequestError):
            client.generate(prompt="a", token_ids=[1])
        with pytest.raises(InvalidRequestError):
            client.generate()
        with pytest.raises(InvalidRequestError, match="no_such_field"):
            client.generate(prompt="a", no_such_field=1)
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            client.generate(prompt="a", max_tokens=-1)
        with pytest.raises(InvalidRequestError):
            client.generate(prompt="a", stop=[1, 2])
        long_prompt = " ".join(["word"] * (MAX_MODEL_LEN + 10))
        n = len(tokenizer.encode_prompt(long_prompt))
        with pytest.raises(InvalidRequestError, match=f"prompt has {n} tokens, more than max_model_len {MAX_MODEL_LEN}"):
            await _collect(client, prompt=long_prompt)
        with pytest.raises(InvalidRequestError, match="out of the vocabulary"):
            await _collect(client, token_ids=[10**9])
    assert len(engine.core.added()) == added


async def test_max_tokens_capped_to_context(engine: Engine) -> None:
    async with AsyncClient(engine.address) as client:
        await _collect(client, token_ids=list(range(10, 70)), max_tokens=MAX_MODEL_LEN)
        with pytest.raises(InvalidRequestError, match="more than max_model_len"):
            await _collect(client, token_ids=[5], max_tokens=MAX_MODEL_LEN + 1)
    assert engine.core.added()[-1].sampling.max_tokens == MAX_MODEL_LEN - 60


async def test_malformed_frames_do_not_kill_the_frontend(engine: Engine) -> None:
    context = zmq.asyncio.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.connect(engine.address)
    try:
        await raw.send_multipart([b"\xc1garbage"])
        await raw.send_multipart([msgspec.msgpack.encode(["generate", 7, "x", 3.5])])
        reply = Decoder(FrontendMessage).decode(await asyncio.wait_for(raw.recv_multipart(), 5))
        assert isinstance(reply, StreamError) and reply.stream_id == 7 and reply.kind == "invalid"
        await raw.send_multipart(Encoder().encode(StreamError(1, "x", "a client-bound message")))
    finally:
        raw.close(linger=0)
    async with AsyncClient(engine.address) as client:
        outs = await _collect(client, token_ids=[5, 6], max_tokens=2)
    assert outs[-1].finish_reason == "length"
    assert engine.process.poll() is None


async def test_core_death_fails_streams_and_calls(fresh_engine: Engine) -> None:
    async with AsyncClient(fresh_engine.address) as client:
        stream = client.generate(token_ids=[1, 2], request_id="slow-3")
        first = await stream.__anext__()
        assert first.finish_reason is None
        call = asyncio.create_task(client.call("hang", timeout=60))
        await asyncio.sleep(0.2)
        fresh_engine.core_stand_in.kill()
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await call
        assert time.monotonic() - started < 10
        with pytest.raises(EngineDeadError):
            await _collect(client, prompt="after death")
        with pytest.raises(EngineDeadError):
            await client.ping()


async def test_frontend_death_fails_the_client(fresh_engine: Engine) -> None:
    async with AsyncClient(fresh_engine.address) as client:
        stream = client.generate(token_ids=[1, 2], request_id="slow-3")
        await stream.__anext__()
        call = asyncio.create_task(client.call("hang", timeout=60))
        await asyncio.sleep(0.2)
        fresh_engine.process.kill()
        with pytest.raises(EngineDeadError):
            async with asyncio.timeout(10):
                async for _ in stream:  # outputs already received come first
                    pass
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(call, 10)
        with pytest.raises(EngineDeadError):
            await client.ping()


async def test_sigterm_shuts_down_cleanly(fresh_engine: Engine) -> None:
    async with AsyncClient(fresh_engine.address) as client:
        stream = client.generate(token_ids=[1, 2], request_id="slow-4")
        await stream.__anext__()
        fresh_engine.process.terminate()
        with pytest.raises(EngineDeadError):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
    assert await asyncio.to_thread(fresh_engine.process.wait, 10) == 0
