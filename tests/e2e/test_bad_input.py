"""Bad input gets a clear error for that request; other streams and the engine go on."""

import asyncio
import os

import pytest
import zmq
import zmq.asyncio

from frontend.client import AsyncClient, InvalidRequestError
from protocol.codec import Decoder, Encoder
from protocol.messages import FrontendMessage, GenerateRequest, SamplingParams, StreamError
from tests.e2e.engine import start_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = start_engine(tiny_models["llama"], "--max-model-len", "256")
    yield engine
    engine.stop()


async def _long_stream(client: AsyncClient) -> list:
    return [out async for out in client.generate(prompt="Count to ten", max_tokens=120, ignore_eos=True)]


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens must be >= 1"),
        ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens 1000000000 is more than max_model_len 256"),
        ({"token_ids": list(range(1000, 1300))}, "prompt has 300 tokens"),
        ({"prompt": "hi", "temprature": 0.5}, "unknown field `temprature`"),
        ({"prompt": "hi", "token_ids": [1, 2]}, "exactly one of prompt, messages or token_ids"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({"token_ids": [10**7]}, "out of the vocabulary"),
    ],
)
def test_invalid_request_gets_a_clear_error_while_others_go_on(engine, request_fields, message):
    async def run():
        async with AsyncClient(engine.addresses[0]) as client:
            other = asyncio.create_task(_long_stream(client))
            with pytest.raises(InvalidRequestError, match=message):
                async for _ in client.generate(**request_fields):
                    pass
            outputs = await other
            assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == 120
    asyncio.run(run())


def test_invalid_sampling_sent_raw_is_refused_by_the_frontend(engine):
    """A client that skips the Python client's checks still gets an error from the frontend."""
    async def run():
        context = zmq.asyncio.Context()
        sock = context.socket(zmq.DEALER)
        sock.connect(engine.addresses[0])
        bad = GenerateRequest(stream_id=1, prompt="hi", sampling=SamplingParams(max_tokens=-1, top_p=7.0))
        await sock.send_multipart(Encoder().encode(bad))
        reply = Decoder(FrontendMessage).decode(await asyncio.wait_for(sock.recv_multipart(), 10))
        sock.close(linger=0)
        context.term()
        return reply
    reply = asyncio.run(run())
    assert isinstance(reply, StreamError) and reply.kind == "invalid" and "max_tokens" in reply.message


def test_malformed_frames_at_frontend_and_core_are_dropped(engine):
    async def run():
        context = zmq.asyncio.Context()
        targets = [engine.addresses[0], "ipc://" + os.path.join(engine.run_dir, "core-input")]
        for address in targets:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(address)
            for junk in ([b"\xc1\xff garbage"], [b""], [b"\x93\xa3add\x01"], [b"\x91\x01", b"extra"]):
                await sock.send_multipart(junk)
            sock.close()
        context.term()
        async with AsyncClient(engine.addresses[0]) as client:
            return await _long_stream(client)
    outputs = asyncio.run(run())
    assert outputs[-1].finish_reason == "length"
    assert any("malformed" in line for line in engine.log)
