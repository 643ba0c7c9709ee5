"""The public Python client: `AsyncClient`, and `Client`, the same calls made blocking.

    async with AsyncClient("tcp://127.0.0.1:8100") as c:
        async for out in c.generate(prompt="Once upon a time", max_tokens=64):
            print(out.text, end="")

Every wait has a way out: a socket monitor notices a lost frontend (every open stream and
call then raises `EngineDeadError`, and so does every later call), and utility calls time out.
Leaving a `generate` loop early (break, exception, cancellation) cancels the request. The client
connects on first use (as the openai SDK does); `async with` / `connect()` only do it sooner.
"""

import asyncio
import itertools
import logging
import threading
from typing import Any, AsyncIterator, Coroutine, Iterable, Iterator, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol.codec import Decoder, Encoder, encode_args
from protocol.errors import (
    EngineDeadError,
    EnginePausedError,
    InvalidRequestError,
    UtilityError,
    error_from_kind,
)
from protocol.messages import (
    AbortArgs,
    AbortResult,
    CallResult,
    CancelStream,
    ChatMessage,
    ClientCall,
    EngineState,
    FrontendMessage,
    GenerateRequest,
    PauseArgs,
    RequestOutput,
    SamplingParams,
    StepProfile,
    StreamError,
    StreamOutputs,
    validate_sampling,
)
from protocol.weights import ResumeArgs, TensorPiece

from frontend.sockets import monitor_socket, send_now
from frontend.weight_calls import BlockingWeightCalls, WeightCalls

__all__ = ["AsyncClient", "Client", "RequestOutput", "EngineDeadError", "EnginePausedError",
           "InvalidRequestError", "UtilityError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncClient(WeightCalls):
    """A connection to one frontend; many concurrent streams and calls may share it. The weight
    calls (`update_weights`, `init_weight_group`, `sleep`, ...) come from `WeightCalls`."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: zmq.asyncio.Socket | None = None
        self._encoder = Encoder()
        self._decoder = Decoder(FrontendMessage)
        self._streams: dict[int, asyncio.Queue[RequestOutput | Exception]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting: asyncio.Future[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect now (else the first call does); EngineDeadError when no frontend answers
        within `timeout` seconds."""
        await self._connected()

    async def _open(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # The monitor must listen before the connection starts, or it misses EVENT_CONNECTED.
        monitor = monitor_socket(sock, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        try:
            await asyncio.wait_for(_next_event(monitor, zmq.EVENT_CONNECTED), self.timeout)
        except TimeoutError:
            monitor.close(linger=0)
            sock.close(linger=0)
            raise EngineDeadError(f"no frontend at {self.address} within {self.timeout} s") from None
        self._sock = sock
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._watch(monitor)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail("the client was closed")
        if self._sock is not None:
            self._sock.close(linger=0)

    def generate(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        hold_while_paused: bool = False,
        **sampling: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; checks its input (InvalidRequestError) before sending.
        Only requests of the same `cache_salt` share prefix-cache blocks. `hold_while_paused`:
        held while the engine is paused even under `--paused-requests reject`."""
        request = GenerateRequest(
            stream_id=next(self._ids),
            request_id=request_id,
            prompt=prompt,
            messages=_chat_messages(messages),
            token_ids=token_ids,
            sampling=_sampling(sampling),
            cache_salt=cache_salt,
            hold_while_paused=hold_while_paused,
        )
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or token_ids")
        return self._stream(request)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        await self._connected()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.stream_id] = queue
        finished = False
        try:
            self._send(request)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request.stream_id, None)
            if not finished and self._dead is None:
                self._send(CancelStream(request.stream_id))

    async def call(
        self, method: str, args: Any = None, timeout: float | None = None, tensors: list[TensorPiece] | None = None
    ) -> Any:
        """A utility call (`args`: a struct or dict of the method's arguments; `tensors`: pieces of
        a weight transfer, sent as side frames); its value."""
        await self._connected()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._send(ClientCall(call_id, method, encode_args(args), tensors or []))
            return await asyncio.wait_for(future, timeout or self.timeout)
        except TimeoutError:
            raise TimeoutError(f"{method} got no answer within {timeout or self.timeout} s")
        finally:
            self._calls.pop(call_id, None)

    async def ping(self) -> Any:
        return await self.call("ping")

    async def get_state(self) -> EngineState:
        return msgspec.convert(await self.call("get_state"), EngineState)

    async def is_paused(self) -> bool:
        return bool(await self.call("is_paused"))

    async def pause(self, mode: str = "abort", timeout: float | None = None, retract: bool = False) -> EngineState:
        """Returns once paused: abort and keep at once, wait after the last running request ended.
        `retract` (keep): frozen requests free their KV now and prefill again on resume."""
        return msgspec.convert(await self.call("pause", PauseArgs(mode, retract), timeout), EngineState)

    async def resume(self, kv: str = "keep") -> EngineState:
        """Run again. After a weight update, `kv="recompute"` prefills each frozen request's tokens
        with the new weights first; "keep" continues on the KV the old ones computed."""
        return msgspec.convert(await self.call("resume", ResumeArgs(kv)), EngineState)

    async def abort(self, request_ids: Iterable[str]) -> AbortResult:
        """Abort by the users' ids; returns after the aborted requests' final outputs were sent."""
        return msgspec.convert(await self.call("abort", AbortArgs(list(request_ids))), AbortResult)

    async def abort_all(self) -> AbortResult:
        return msgspec.convert(await self.call("abort_all"), AbortResult)

    async def start_profile(self) -> None:
        """Time the parts of every step from now on (`core.profile` names them)."""
        await self.call("start_profile")

    async def stop_profile(self) -> StepProfile:
        """The steps' times since `start_profile`, by kind and part."""
        return msgspec.convert(await self.call("stop_profile"), StepProfile)

    async def _receive(self) -> None:
        while self._sock is not None:
            frames = await self._sock.recv_multipart()
            try:
                self._dispatch(self._decoder.decode(frames))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                logger.error("dropped a malformed frame from the frontend: %s", error)

    def _dispatch(self, message: StreamOutputs | StreamError | CallResult) -> None:
        match message:
            case StreamOutputs(items=items):
                for item in items:
                    self._put(item.stream_id, item.output)
            case StreamError(stream_id=stream_id, kind=kind, message=text):
                self._put(stream_id, error_from_kind(kind, text))
            case CallResult(call_id=call_id):
                future = self._calls.pop(call_id, None)
                if future is None or future.done():
                    return
                if message.error_kind is not None or message.error is not None:
                    future.set_exception(error_from_kind(message.error_kind or "", message.error or ""))
                else:
                    future.set_result(message.value)

    def _put(self, stream_id: int, item: RequestOutput | Exception) -> None:
        queue = self._streams.get(stream_id)
        if queue is not None:  # else the stream was left: its late outputs are dropped
            queue.put_nowait(item)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            await _next_event(monitor, zmq.EVENT_DISCONNECTED)
            self._fail(f"lost the frontend at {self.address}")
        finally:
            monitor.close(linger=0)

    def _fail(self, reason: str) -> None:
        """Every open stream and call raises EngineDeadError, and so will later ones."""
        if self._dead is not None:
            return
        self._dead = reason
        for queue in self._streams.values():
            queue.put_nowait(EngineDeadError(reason))
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))

    async def _connected(self) -> None:
        """Connect on first use; concurrent first uses wait for the same attempt, and a failed
        attempt (EngineDeadError) is tried again by the next use."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._sock is not None:
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        await asyncio.shield(self._connecting)

    def _send(self, message: Any) -> None:
        if self._sock is not None:
            send_now(self._sock, self._encoder.encode(message))


class Client(BlockingWeightCalls):
    """`AsyncClient`'s calls, blocking: they run on an event loop in a background thread."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self._async = AsyncClient(address, timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zeroserve-client", daemon=True)

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (else the first call does)."""
        self._run(self._async.connect())

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[RequestOutput]:
        """See `AsyncClient.generate`; leaving the loop early cancels the request."""
        return self._iterate(self._async.generate(*args, **kwargs))

    def _iterate(self, stream: AsyncIterator[RequestOutput]) -> Iterator[RequestOutput]:
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())  # type: ignore[attr-defined]

    def call(self, method: str, args: Any = None, timeout: float | None = None) -> Any:
        return self._run(self._async.call(method, args, timeout))

    def ping(self) -> Any:
        return self._run(self._async.ping())

    def get_state(self) -> EngineState:
        return self._run(self._async.get_state())

    def is_paused(self) -> bool:
        return self._run(self._async.is_paused())

    def pause(self, mode: str = "abort", timeout: float | None = None, retract: bool = False) -> EngineState:
        return self._run(self._async.pause(mode, timeout, retract))

    def resume(self, kv: str = "keep") -> EngineState:
        return self._run(self._async.resume(kv))

    def abort(self, request_ids: Iterable[str]) -> AbortResult:
        return self._run(self._async.abort(request_ids))

    def abort_all(self) -> AbortResult:
        return self._run(self._async.abort_all())

    def start_profile(self) -> None:
        self._run(self._async.start_profile())

    def stop_profile(self) -> StepProfile:
        return self._run(self._async.stop_profile())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            if self._loop.is_closed():
                coro.close()
                raise EngineDeadError("the client was closed")
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


async def _next_event(monitor: zmq.asyncio.Socket, event: int) -> None:
    while parse_monitor_message(await monitor.recv_multipart())["event"] != event:
        pass


def _sampling(fields: dict[str, Any]) -> SamplingParams:
    if isinstance(fields.get("stop"), str):
        fields = {**fields, "stop": [fields["stop"]]}
    try:
        params = msgspec.convert(fields, SamplingParams)
        validate_sampling(params)
    except (msgspec.ValidationError, ValueError) as error:
        raise InvalidRequestError(f"bad sampling parameters: {error}") from error
    return params


def _chat_messages(messages: list[dict[str, str]] | None) -> list[ChatMessage] | None:
    if messages is None:
        return None
    try:
        return msgspec.convert(messages, list[ChatMessage])
    except msgspec.ValidationError as error:
        raise InvalidRequestError(f"bad chat messages: {error}") from error
