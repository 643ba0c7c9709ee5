"""Control calls under stress: random interleavings from two frontends, bursts, and a dying core.

Every await has a deadline, so a hang fails the test with the operation that hung instead of
stalling the run.
"""

import asyncio
import collections
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field

import pytest
import zmq
import zmq.asyncio

from frontend.client import AsyncClient, EngineDeadError, UtilityError
from protocol.codec import Decoder, Encoder
from protocol.messages import (
    AbortFence,
    AbortFenceAck,
    AddRequest,
    CoreMessage,
    CoreOutput,
    CoreOutputs,
    EngineReady,
    FrontendHello,
    SamplingParams,
)
from tests.e2e.engine import start_engine
from tests.e2e.streams import Stream

pytestmark = pytest.mark.timeout(300)

OP_DEADLINE_S = 20.0
DEAD_WITHIN_S = 10.0
NUM_OPS = 200
# The errors a pause may answer when calls race: a pause of another mode is already pending or in
# force, or a resume cancelled a pending pause(wait).
ACCEPTED_PAUSE_ERRORS = ("already", "cancelled by resume")


async def _within(awaitable, what: str, timeout: float = OP_DEADLINE_S):
    """`awaitable`'s result; an AssertionError naming `what` if it takes longer than `timeout`."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AssertionError(f"{what} did not finish within {timeout} s")
    return task.result()


async def _until_idle(client: AsyncClient, timeout: float = 30.0):
    """The state once nothing runs, waits or is held (the pool then has every block back)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await _within(client.get_state(), "get_state")
        if state.num_running == state.num_waiting == state.num_held == state.num_frozen == 0:
            return state
        assert time.monotonic() < deadline, f"the control_engine did not become idle: {state}"
        await asyncio.sleep(0.05)


def _ends_exactly_once(stream: Stream) -> str | None:
    """What is wrong with how `stream` ended, or None."""
    finals = [i for i, o in enumerate(stream.outputs) if o.finished]
    if stream.error is not None:
        return None if not finals else f"{stream.request_id}: an error after a final output"
    if stream.left:
        return None if finals in ([], [len(stream.outputs) - 1]) else f"{stream.request_id}: finals at {finals}"
    if finals != [len(stream.outputs) - 1]:
        return f"{stream.request_id}: finals at {finals} of {len(stream.outputs)} outputs"
    final, max_tokens = stream.final, stream.request["max_tokens"]
    if final.num_output_tokens != len(stream.tokens) or len(stream.tokens) > max_tokens:
        return f"{stream.request_id}: {len(stream.tokens)} tokens, final says {final.num_output_tokens}"
    if final.finish_reason == "length" and len(stream.tokens) != max_tokens:
        return f"{stream.request_id}: length after {len(stream.tokens)} of {max_tokens} tokens"
    if final.finish_reason not in ("length", "abort"):
        return f"{stream.request_id}: finish_reason {final.finish_reason!r}"
    return None


# ---- 1. random interleavings ------------------------------------------------------------------


@dataclass
class Interleaving:
    """Random control operations from several clients; what each did, to check at the end."""

    rng: random.Random
    clients: list[AsyncClient]
    streams: list[Stream] = field(default_factory=list)
    aborted_ids: set[str] = field(default_factory=set)
    trace: list[str] = field(default_factory=list)

    def next_op(self):
        """One random operation as (description, coroutine)."""
        rng, index = self.rng, self.rng.randrange(len(self.clients))
        client, kind = self.clients[index], rng.choices(
            ["generate", "abort", "pause", "resume", "cancel", "state"], weights=[8, 2, 2, 2, 2, 1])[0]
        if kind == "generate":
            return self._generate(client, index)
        if kind == "abort":
            ids = rng.sample([s.request_id for s in self.streams], min(len(self.streams), rng.randint(1, 3)))
            return f"c{index} abort({ids + ['nobody']})", self._abort(client, ids + ["nobody"])
        if kind == "pause":
            mode = rng.choice(["abort", "wait", "keep"])
            return f"c{index} pause({mode})", self._pause(client, mode)
        if kind == "resume":
            return f"c{index} resume", self._resume(client)
        if kind == "cancel":
            return self._cancel()
        return f"c{index} get_state", self._state(client)

    def _generate(self, client: AsyncClient, index: int):
        rng, n = self.rng, len(self.streams)
        request = dict(prompt=f"Story {n}:", request_id=f"s{n}", max_tokens=rng.randint(1, 30), ignore_eos=True,
                       temperature=0.0)
        leave_after = rng.randint(1, 5) if rng.random() < 0.2 else None
        self.streams.append(Stream(client, leave_after=leave_after, **request))
        return f"c{index} generate(s{n}, max_tokens={request['max_tokens']}, leave_after={leave_after})", _nothing()

    async def _abort(self, client: AsyncClient, ids: list[str]) -> str:
        result = await client.abort(ids)
        assert sorted(result.aborted + result.not_found) == sorted(ids), f"abort({ids}) answered {result}"
        self.aborted_ids.update(result.aborted)
        return f"aborted={result.aborted}"

    async def _pause(self, client: AsyncClient, mode: str) -> str:
        try:
            state = await client.pause(mode, timeout=OP_DEADLINE_S + 5)
        except UtilityError as error:
            assert any(text in str(error) for text in ACCEPTED_PAUSE_ERRORS), f"pause({mode}) failed: {error}"
            return f"UtilityError({error})"
        assert state.state == "paused", f"pause({mode}) answered {state}"
        return f"{state.state}({state.mode})"

    async def _resume(self, client: AsyncClient) -> str:
        state = await client.resume()
        assert state.state == "running", f"resume answered {state}"
        return state.state

    def _cancel(self):
        live = [s for s in self.streams if not s.task.done()]
        if not live:
            return "cancel (no live stream)", _nothing()
        stream = self.rng.choice(live)
        stream.cancel()
        return f"cancel {stream.request_id}", _nothing()

    async def _state(self, client: AsyncClient) -> str:
        state = await client.get_state()
        assert 0 <= state.num_free_blocks <= state.num_total_blocks, state
        return f"{state.state}({state.mode}) running={state.num_running} held={state.num_held}"

    async def run_batch(self, size: int) -> None:
        ops = [self.next_op() for _ in range(size)]
        started = time.monotonic()
        tasks = [asyncio.create_task(_within(coro, what)) for what, coro in ops]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self.trace.append(f"-- batch of {size}: {time.monotonic() - started:.2f} s")
        self.trace.extend(f"{what} -> {result!r}" for (what, _), result in zip(ops, results))
        for (what, _), result in zip(ops, results):
            if isinstance(result, BaseException):
                raise AssertionError(f"{what} failed: {result!r}") from result


async def _nothing() -> str:
    return "ok"


@pytest.mark.parametrize("seed", [0, 1])
def test_random_interleavings_never_hang_and_give_every_block_back(control_engine, seed):
    async def run():
        clients = [AsyncClient(address) for address in control_engine.addresses for _ in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            start = await _until_idle(clients[0])
            run = Interleaving(random.Random(seed), clients)
            try:
                done = 0
                while done < NUM_OPS:
                    size = min(run.rng.randint(1, 5), NUM_OPS - done)
                    await run.run_batch(size)
                    done += size
                    await asyncio.sleep(run.rng.choice([0, 0, 0.01, 0.05]))
                await _within(clients[0].resume(), "the final resume")
                await _within(asyncio.gather(*(s.task for s in run.streams), return_exceptions=True),
                              "the streams' ends", timeout=60)
                end = await _until_idle(clients[1])
            finally:
                print(f"seed {seed} trace:\n" + "\n".join(run.trace))
            return start, end, run
    start, end, run = asyncio.run(run())
    assert end.state == "running"
    assert end.num_free_blocks == end.num_total_blocks == start.num_total_blocks
    problems = [p for p in map(_ends_exactly_once, run.streams) if p]
    assert problems == []
    not_aborted = [s.request_id for s in run.streams
                   if s.request_id in run.aborted_ids and not s.left and s.error is None
                   and s.final.finish_reason != "abort"]
    assert not_aborted == []
    reasons = collections.Counter(s.final.finish_reason if s.outputs and not s.left else "left" for s in run.streams)
    print(f"seed {seed}: {len(run.streams)} streams, {dict(reasons)}")
    assert reasons["abort"] > 0 and reasons["length"] > 0


@pytest.mark.parametrize("mode", ["wait", "keep"])
def test_a_second_pause_while_paused_in_the_same_mode_answers_at_once(control_engine, mode):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client:
            try:
                first = await _within(client.pause(mode), "the first pause")
                second = await _within(client.pause(mode, timeout=3.0), "the second pause")
            finally:
                await _within(client.resume(), "resume")
            return first, second
    first, second = asyncio.run(run())
    assert first.state == second.state == "paused"


# ---- 2. a burst, then abort everything at once --------------------------------------------------


def _burst_request(i: int) -> dict:
    return dict(prompt=f"Burst {i}:", request_id=f"burst-{i}", max_tokens=40, ignore_eos=True, temperature=0.0)


@pytest.mark.parametrize("call", ["abort_all", "pause_abort"])
def test_a_burst_then_abort_leaves_no_output_after_the_call_returned(control_engine, call):
    async def run():
        async with AsyncClient(control_engine.addresses[0]) as client:
            streams = [Stream(client, **_burst_request(i)) for i in range(30)]
            # A task starts after the streams' tasks: the requests go out first, on the same socket.
            control = client.abort_all() if call == "abort_all" else client.pause("abort")
            result = await _within(asyncio.create_task(control), call)
            returned_at = time.monotonic()
            resumed_at = returned_at
            if call == "pause_abort":
                await asyncio.sleep(0.3)  # a window in which nothing may arrive
                resumed_at = time.monotonic()
                await _within(client.resume(), "resume")
            await _within(asyncio.gather(*(s.task for s in streams)), "the streams' ends", timeout=60)
            state = await _until_idle(client)
            return result, streams, returned_at, resumed_at, state
    result, streams, returned_at, resumed_at, state = asyncio.run(run())
    assert [p for p in map(_ends_exactly_once, streams) if p] == []
    aborted = [s for s in streams if s.final.finish_reason == "abort"]
    print(f"{call}: {len(aborted)} of {len(streams)} aborted, {sum(len(s.tokens) for s in aborted)} tokens before")
    if call == "abort_all":
        assert sorted(result.aborted) == sorted(s.request_id for s in aborted)
    assert aborted, "the call aborted none of the burst"
    late = [s.request_id for s in aborted if s.times[-1] > returned_at]
    assert late == []
    assert not any(returned_at < t < resumed_at for s in streams for t in s.times)
    assert state.num_free_blocks == state.num_total_blocks


class RawFrontend:
    """A frontend played by the test on the core's own sockets, to hold back its AbortFenceAck:
    what a real frontend's requests look like while they are on their way to the core."""

    INDEX = 9

    def __init__(self, run_dir: str) -> None:
        self.context = zmq.asyncio.Context()
        identity = f"frontend-{self.INDEX}".encode()
        self.output = self._socket(identity, os.path.join(run_dir, "core-output"))
        self.input = self._socket(identity, os.path.join(run_dir, "core-input"))
        self.encoder, self.decoder = Encoder(), Decoder(CoreMessage)

    def _socket(self, identity: bytes, path: str) -> zmq.asyncio.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("ipc://" + path)
        return sock

    async def send(self, message) -> None:
        await self.input.send_multipart(self.encoder.encode(message))

    async def receive(self, kind: type):
        """The next message of `kind` (others, such as the fences of earlier tests, are skipped)."""
        while True:
            message = self.decoder.decode(await _within(self.output.recv_multipart(), f"a {kind.__name__}"))
            if isinstance(message, kind):
                return message

    async def outputs_until_final(self, request_id: str) -> list[CoreOutput]:
        outputs = []
        while not outputs or outputs[-1].finish_reason is None:
            batch = await self.receive(CoreOutputs)
            outputs += [o for o in batch.outputs if o.request_id == request_id]
        return outputs

    def add(self, request_id: str) -> AddRequest:
        sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        return AddRequest(request_id, request_id, self.INDEX, [5, 6, 7, 8], sampling)

    def close(self) -> None:
        self.context.destroy(linger=0)


def test_requests_on_their_way_when_everything_is_aborted_are_aborted_on_arrival(control_engine):
    """abort_all through frontend 0 fences every frontend: a request another frontend sent before
    it acknowledged the fence is aborted on arrival, without a token; after the ack, one runs."""
    async def run():
        raw = RawFrontend(control_engine.run_dir)
        try:
            await raw.send(FrontendHello(RawFrontend.INDEX))
            await raw.receive(EngineReady)
            async with AsyncClient(control_engine.addresses[0]) as client:
                await _within(client.abort_all(), "abort_all")
            fence = await raw.receive(AbortFence)
            await raw.send(raw.add("on-its-way"))
            resent = await raw.receive(AbortFence)  # again, before the abort: in case one was lost
            before_ack = await raw.outputs_until_final("on-its-way")
            await raw.send(AbortFenceAck(RawFrontend.INDEX, fence.fence_id))
            await raw.send(raw.add("after-the-ack"))
            after_ack = await raw.outputs_until_final("after-the-ack")
            return fence, resent, before_ack, after_ack
        finally:
            raw.close()
    fence, resent, before_ack, after_ack = asyncio.run(run())
    assert resent.fence_id == fence.fence_id
    assert [(o.finish_reason, o.new_token_ids) for o in before_ack] == [("abort", [])]
    assert after_ack[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in after_ack) == 3


# ---- 3. the core dies while a pause(wait) is pending ------------------------------------------


def test_sigkill_of_the_core_fails_a_pending_pause_wait(tiny_models):
    engine = start_engine(tiny_models["llama"], frontends=2)
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client, AsyncClient(engine.addresses[1]) as other:
                stream = Stream(client, prompt="Tell me a long story", request_id="long", max_tokens=1500,
                                ignore_eos=True, temperature=0.0)
                deadline = time.monotonic() + 60
                while not stream.outputs:
                    assert time.monotonic() < deadline, "the long request produced nothing"
                    await asyncio.sleep(0.01)
                pending = asyncio.create_task(client.pause("wait", timeout=60))
                while (await _within(other.get_state(), "get_state")).state != "pausing":
                    assert not pending.done(), f"pause(wait) ended before the kill: {pending}"
                    await asyncio.sleep(0.01)
                os.kill(engine.child_pid("zeroserve-core"), signal.SIGKILL)
                killed_at = time.monotonic()
                with pytest.raises(EngineDeadError):
                    await _within(pending, "the pending pause(wait)", timeout=DEAD_WITHIN_S)
                failed_after = time.monotonic() - killed_at
                await _within(stream.task, "the long stream", timeout=DEAD_WITHIN_S)
                return failed_after, stream
        failed_after, stream = asyncio.run(run())
    finally:
        engine.stop()
    assert failed_after < DEAD_WITHIN_S
    assert isinstance(stream.error, EngineDeadError)
