"""Step interrupts from the core, received beside the step in flight.

The core publishes `InterruptStep(step_id)` on a socket of its own when a pause need not wait for
the running step. A thread here receives it while the main thread is inside a forward (torch
releases the GIL in its kernels); the forward asks `requested(step_id)` between layers and stops
with `StepInterrupted`. An interrupt for a step that already ended matches no later step.
"""

import logging
import threading

import msgspec
import zmq

from protocol.codec import Decoder
from protocol.process import make_socket
from protocol.step import InterruptStep

logger = logging.getLogger(__name__)

POLL_MS = 200


class StepInterrupted(Exception):
    """The forward stopped between two layers; nothing it computed counts."""


class InterruptWatcher:
    def __init__(self, context: zmq.Context, address: str) -> None:
        self._socket = make_socket(context, zmq.SUB, address, bind=False)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._decoder = Decoder(InterruptStep)
        self._interrupted_step = -1
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="worker-interrupts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def requested(self, step_id: int) -> bool:
        return self._interrupted_step == step_id

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2 * POLL_MS / 1000)

    def _serve(self) -> None:
        try:
            while not self._stopped.is_set():
                if self._socket.poll(POLL_MS):
                    self._receive()
        finally:
            self._socket.close()

    def _receive(self) -> None:
        frames = self._socket.recv_multipart()
        try:
            message = self._decoder.decode(frames)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            logger.error("malformed interrupt from the core, skipped: %s", error)
            return
        self._interrupted_step = message.step_id
