"""The frontend's link to the core.

    frontend ──DEALER "frontend-i"──▶ core input ROUTER     (hello, requests, aborts, utility calls)
    frontend ◀─DEALER "frontend-i"─── core output ROUTER    (EngineReady, then outputs and results)

Outputs and utility results come back on one ordered stream, so a call's result is handled
after every output the core emitted before it. When the core dies, every pending utility
future fails with `EngineDeadError`, the handler fails every open stream, and later calls fail
at once.
"""

import asyncio
import logging
import os
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig
from protocol.errors import EngineDeadError, error_from_kind
from protocol.messages import (
    AbortFence,
    AbortFenceAck,
    AbortRequests,
    AddRequest,
    CoreMessage,
    CoreOutput,
    CoreOutputs,
    EngineReady,
    FrontendHello,
    UtilityCall,
    UtilityResult,
)
from protocol.process import make_socket
from protocol.weights import TensorPiece

from frontend.sockets import monitor_socket, send_now

logger = logging.getLogger(__name__)


class CoreOutputHandler(Protocol):
    def on_outputs(self, outputs: list[CoreOutput]) -> None: ...

    def on_core_dead(self, reason: str) -> None: ...


class CoreClient:
    """Sends requests, aborts and utility calls to the core; dispatches what comes back."""

    def __init__(self, index: int, input_sock: zmq.asyncio.Socket, output_sock: zmq.asyncio.Socket):
        self.index = index
        self.dead_reason: str | None = None
        self._input = input_sock
        self._output = output_sock
        self._encoder = Encoder()
        self._decoder = Decoder(CoreMessage)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next_call_id = 0
        self._handler: CoreOutputHandler | None = None

    def add_request(self, request: AddRequest) -> None:
        self._check_alive()
        self._send(request)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_reason is None:
            self._send(AbortRequests(client_index=self.index, request_ids=request_ids))

    def hello(self) -> None:
        self._send(FrontendHello(client_index=self.index, pid=os.getpid()))

    def call(self, method: str, args: bytes = b"", tensors: list[TensorPiece] | None = None) -> asyncio.Future[Any]:
        """Start a utility call (`tensors`: a weight chunk's pieces, sent as side frames); the
        future resolves with its value or fails with a typed error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.dead_reason is not None:
            future.set_exception(EngineDeadError(self.dead_reason))
            return future
        self._next_call_id += 1
        self._futures[self._next_call_id] = future
        self._send(UtilityCall(self.index, self._next_call_id, method, args, tensors or []))
        return future

    async def run(self, handler: CoreOutputHandler) -> None:
        """Dispatch the core's messages to `handler` until cancelled; watch the link meanwhile."""
        self._handler = handler
        if self.dead_reason is not None:
            handler.on_core_dead(self.dead_reason)
        monitor = asyncio.create_task(self._watch_disconnect())
        try:
            while True:
                frames = await self._output.recv_multipart()
                self._dispatch(frames)
        finally:
            monitor.cancel()

    def mark_dead(self, reason: str) -> None:
        """The core is gone: fail every pending call and (through the handler) every stream."""
        if self.dead_reason is not None:
            return
        logger.error("core lost: %s", reason)
        self.dead_reason = reason
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineDeadError(f"engine core died: {reason}"))
        if self._handler is not None:
            self._handler.on_core_dead(reason)

    def close(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            message = self._decoder.decode(frames)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            logger.error("dropped a malformed frame from the core: %s", error)
            return
        match message:
            case CoreOutputs(outputs=outputs):
                if self._handler is not None:
                    self._handler.on_outputs(outputs)
            case UtilityResult():
                self._resolve(message)
            case AbortFence(fence_id=fence_id):
                # On the input socket after every request sent so far: the core aborts those on arrival.
                self._send(AbortFenceAck(self.index, fence_id))
            case EngineReady():
                logger.warning("ignored a second EngineReady from the core")

    def _resolve(self, result: UtilityResult) -> None:
        future = self._futures.pop(result.call_id, None)
        if future is None or future.done():
            logger.debug("result of unknown or finished call %d dropped", result.call_id)
        elif result.error_kind is not None or result.error is not None:
            future.set_exception(error_from_kind(result.error_kind or "utility", result.error or ""))
        else:
            future.set_result(result.value)

    async def _watch_disconnect(self) -> None:
        """A dropped output connection means the core's socket (and so the core) is gone."""
        monitor = monitor_socket(self._output, zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.mark_dead("the core's output socket disconnected")
                    return
        finally:
            if not self._output.closed:
                self._output.disable_monitor()
            monitor.close(linger=0)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"engine core died: {self.dead_reason}")

    def _send(self, message: Any) -> None:
        send_now(self._input, self._encoder.encode(message))


async def connect_core(
    context: zmq.asyncio.Context, config: EngineConfig, index: int, timeout_s: float
) -> tuple[CoreClient, EngineReady]:
    """Connect both sockets (output first), say hello, and wait for the core's `EngineReady`.

    Raises TimeoutError when no `EngineReady` comes within `timeout_s`.
    """
    identity = f"frontend-{index}".encode()
    output = make_socket(context, zmq.DEALER, config.core_output_address, False, identity)
    input_sock = make_socket(context, zmq.DEALER, config.core_input_address, False, identity)
    core = CoreClient(index, input_sock, output)
    core.hello()
    decoder = Decoder(CoreMessage)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        frames = await asyncio.wait_for(output.recv_multipart(), max(remaining, 0.0))
        try:
            message = decoder.decode(frames)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            logger.error("dropped a malformed frame while waiting for EngineReady: %s", error)
            continue
        if isinstance(message, EngineReady):
            return core, message
        logger.warning("dropped %s received before EngineReady", type(message).__name__)
