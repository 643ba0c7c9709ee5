"""The client API through every process: input forms, sampling, stop strings, streams, frontends."""

import asyncio

import pytest
import transformers

from frontend.client import AsyncClient, Client, UtilityError
from tests.e2e.engine import start_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = start_engine(tiny_models["qwen3"], frontends=2)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return transformers.AutoTokenizer.from_pretrained(tiny_models["qwen3"])


async def _run(address: str, **request) -> list:
    async with AsyncClient(address) as client:
        return [out async for out in client.generate(**request)]


def _text(outputs: list) -> str:
    return "".join(o.text for o in outputs)


def _tokens(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_outputs_are_deltas_with_one_final_output(engine, tokenizer):
    outputs = asyncio.run(_run(engine.addresses[0], prompt="Hello there", max_tokens=12, temperature=0.0,
                               request_id="mine"))
    assert [o.finish_reason for o in outputs][-1] == "length"
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert {o.request_id for o in outputs} == {"mine"}
    final = outputs[-1]
    assert final.num_output_tokens == 12 == len(_tokens(outputs))
    assert final.num_prompt_tokens == len(tokenizer("Hello there").input_ids)
    assert _text(outputs) == tokenizer.decode(_tokens(outputs), skip_special_tokens=True)


def test_prompt_messages_and_token_ids_are_the_same_request(engine, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token_ids = tokenizer(ids, add_special_tokens=False).input_ids
    by_messages = asyncio.run(_run(engine.addresses[0], messages=messages, max_tokens=8, temperature=0.0))
    by_ids = asyncio.run(_run(engine.addresses[1], token_ids=token_ids, max_tokens=8, temperature=0.0))
    assert _tokens(by_messages) == _tokens(by_ids)
    assert by_messages[-1].num_prompt_tokens == len(token_ids)


def test_stop_string_cuts_the_text_before_it(engine):
    address = engine.addresses[0]
    full = _text(asyncio.run(_run(address, prompt="Once", max_tokens=24, temperature=0.0, ignore_eos=True)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    outputs = asyncio.run(_run(address, prompt="Once", max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert outputs[-1].finish_reason == "stop"
    assert _text(outputs) == full[: full.index(stop)]


def test_same_seed_same_tokens_whatever_else_runs(engine):
    async def run():
        async with AsyncClient(engine.addresses[0]) as client:
            async def one(**request):
                return _tokens([o async for o in client.generate(prompt="Pick a word", max_tokens=16, **request)])
            # The tiny model's distributions are peaked: a high temperature makes draws differ.
            alone = await one(seed=7, temperature=20.0)
            crowd = await asyncio.gather(
                one(seed=7, temperature=20.0), one(temperature=20.0), one(seed=3, temperature=20.0, top_p=0.9),
                one(temperature=20.0, top_k=50, min_p=0.01),
            )
            return alone, crowd
    alone, crowd = asyncio.run(run())
    assert crowd[0] == alone
    assert len(set(map(tuple, crowd))) > 1


def test_many_streams_on_two_frontends_each_get_their_own_outputs(engine):
    async def run():
        clients = [AsyncClient(a) for a in engine.addresses for _ in range(2)]
        for client in clients:
            await client.connect()
        try:
            jobs = [
                client.generate(prompt=f"Item {i}", request_id=f"r{i}", max_tokens=5 + i, temperature=0.0,
                                ignore_eos=True)
                for i, client in enumerate(clients * 3)
            ]
            async def drain(job):
                return [o async for o in job]
            return await asyncio.gather(*map(drain, jobs))
        finally:
            for client in clients:
                await client.close()
    results = asyncio.run(run())
    for i, outputs in enumerate(results):
        assert {o.request_id for o in outputs} == {f"r{i}"}
        assert outputs[-1].num_output_tokens == 5 + i and outputs[-1].finish_reason == "length"


def test_breaking_out_of_a_stream_aborts_it_in_the_core(engine):
    async def run():
        async with AsyncClient(engine.addresses[0]) as client:
            async for _ in client.generate(prompt="Go on", max_tokens=1000, ignore_eos=True):
                break
            for _ in range(50):
                state = await client.get_state()
                if state.num_running == 0:
                    return state
                await asyncio.sleep(0.1)
            return state
    state = asyncio.run(run())
    assert state.num_running == 0 and state.num_waiting == 0


def test_blocking_client_streams_and_calls(engine):
    with Client(engine.addresses[1]) as client:
        outputs = list(client.generate(prompt="Hi", max_tokens=6, temperature=0.0, ignore_eos=True))
        assert client.ping() == "pong"
        with pytest.raises(UtilityError, match="unknown utility method"):
            client.call("no_such_method")
        state = client.get_state()
    assert outputs[-1].num_output_tokens == 6
    assert state.num_free_blocks == state.num_total_blocks


def test_profile_times_each_step_by_part(engine):
    """One prefill step and four decode steps, each part timed: the top-level parts add up to the
    step, the forward's parts to the forward. Steps after stop_profile are not counted."""
    top = ["schedule", "send", "worker.prepare", "worker.forward", "worker.sample", "worker.other", "outputs"]
    forward = ["forward.projections", "forward.attention", "forward.lm_head", "forward.other"]
    with Client(engine.addresses[0]) as client:
        with pytest.raises(UtilityError, match="no profile is running"):
            client.stop_profile()
        client.start_profile()
        list(client.generate(token_ids=list(range(10, 30)), max_tokens=5, temperature=0.0, ignore_eos=True))
        profile = client.stop_profile()
        list(client.generate(prompt="Hi", max_tokens=3, temperature=0.0))
        with pytest.raises(UtilityError, match="no profile is running"):
            client.stop_profile()
    assert (profile.steps["prefill"].num_steps, profile.steps["prefill"].num_tokens) == (1, 20)
    assert (profile.steps["decode"].num_steps, profile.steps["decode"].num_tokens) == (4, 4)
    for kind in profile.steps.values():
        seconds = kind.seconds
        assert all(seconds[part] > 0 for part in ["schedule", "worker.forward", *forward]), seconds
        assert sum(seconds[part] for part in top) == pytest.approx(seconds["step"])
        assert sum(seconds[part] for part in forward) == pytest.approx(seconds["worker.forward"])
        assert seconds["step"] <= profile.wall_s
