"""The core's socket threads: the loop only ever touches their queues.

Input: a ROUTER that every frontend's DEALER connects to; frames are decoded here.
Output: a ROUTER that routes each message to the frontend it belongs to, by identity.
"""

import logging
import queue
import threading
import time
from typing import Any

import msgspec
import zmq

from protocol.codec import Decoder, Encoder
from protocol.messages import CoreInput, CoreMessage, EngineReady
from protocol.process import make_socket

logger = logging.getLogger(__name__)

POLL_MS = 100
READY_RETRY_S = 10.0


def frontend_identity(client_index: int) -> bytes:
    return f"frontend-{client_index}".encode()


class InputThread(threading.Thread):
    """Receives `CoreInput` messages into `inbox`. A malformed frame is logged and dropped."""

    def __init__(self, context: zmq.Context, address: str, inbox: "queue.Queue[CoreInput]") -> None:
        super().__init__(name="core-input", daemon=True)
        self._socket = make_socket(context, zmq.ROUTER, address, bind=True)
        self._inbox = inbox
        self._decoder = Decoder(CoreInput)
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                if self._socket.poll(POLL_MS):
                    self._receive()
        finally:
            self._socket.close()

    def _receive(self) -> None:
        identity, *frames = self._socket.recv_multipart(copy=False)
        try:
            self._inbox.put(self._decoder.decode([f.buffer for f in frames]))
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError) as error:
            logger.error("dropped a malformed frame from %r: %s", identity.bytes, error)


class OutputThread(threading.Thread):
    """Sends `(client_index, CoreMessage)` items from `outbox`, in order, to their frontends."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        super().__init__(name="core-output", daemon=True)
        self._socket = make_socket(context, zmq.ROUTER, address, bind=True)
        self.outbox: "queue.Queue[tuple[int, CoreMessage] | None]" = queue.Queue()
        self._encoder = Encoder()

    def send(self, client_index: int, message: CoreMessage) -> None:
        self.outbox.put((client_index, message))

    def stop(self) -> None:
        self.outbox.put(None)

    def run(self) -> None:
        try:
            while (item := self.outbox.get()) is not None:
                self._send(*item)
        finally:
            self._socket.close()

    def _send(self, client_index: int, message: Any) -> None:
        frames = [frontend_identity(client_index), *self._encoder.encode(message)]
        # A frontend's hello comes on the input socket; its output connection may still be
        # in its handshake, so the ready message alone is retried for a while.
        deadline = time.monotonic() + (READY_RETRY_S if isinstance(message, EngineReady) else 0.0)
        while True:
            try:
                self._socket.send_multipart(frames, copy=False)
                return
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    logger.warning("frontend %d unreachable, dropped %s", client_index, type(message).__name__)
                    return
                time.sleep(0.01)
