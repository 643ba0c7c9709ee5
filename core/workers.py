"""Talking to the worker ranks: every rank gets every plan; rank 0 answers with the result.

A thread owns the socket. The loop submits a plan and the result arrives on the loop's own
event queue, beside the frontends' inputs, so the loop serves inputs while a step runs.
"""

import logging
import queue
import threading
import time
from typing import Sequence

import msgspec
import zmq

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig
from protocol.process import make_socket, pid_alive
from protocol.step import CoreToWorker, InterruptStep, Shutdown, StepPlan, WorkerReady, WorkerToCore

logger = logging.getLogger(__name__)

POLL_MS = 100


class WorkerDiedError(RuntimeError):
    pass


class WorkerGroup:
    def __init__(
        self,
        context: zmq.Context,
        config: EngineConfig,
        worker_pids: Sequence[int],
        events: "queue.Queue",
    ) -> None:
        """Step results go to `events` (the loop's queue); ready messages to a queue of their own."""
        self._socket = make_socket(context, zmq.ROUTER, config.worker_address, bind=True)
        # Used by the loop's thread only (the thread above owns the other socket).
        self._interrupts = make_socket(context, zmq.PUB, config.interrupt_address, bind=True)
        self._interrupt_encoder = Encoder()
        self._num_workers = config.workers
        self._pids = list(worker_pids)
        self._encoder = Encoder()
        self._decoder = Decoder(WorkerToCore)
        self._plans: "queue.Queue[CoreToWorker]" = queue.Queue()
        self._readies: "queue.Queue[WorkerReady]" = queue.Queue()
        self._events = events
        self._thread = threading.Thread(target=self._serve, name="core-workers", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> list[WorkerReady]:
        """Every rank's ready message (rank order); raises if one failed, died or timed out."""
        deadline = time.monotonic() + timeout_s
        readies = []
        while len(readies) < self._num_workers:
            try:
                readies.append(self._readies.get(timeout=0.5))
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise WorkerDiedError("the workers did not report ready in time")
        readies.sort(key=lambda r: r.rank)
        failed = [r for r in readies if r.error]
        if failed:
            raise RuntimeError(failed[0].error)
        return readies

    def submit(self, plan: StepPlan) -> None:
        """Run a step; its `StepResult` arrives on the events queue."""
        self._plans.put(plan)

    def interrupt(self, step_id: int) -> None:
        """Ask every rank to abandon step `step_id`; its result may still come complete."""
        self._interrupts.send_multipart(self._interrupt_encoder.encode(InterruptStep(step_id)))

    def check_alive(self) -> None:
        dead = [pid for pid in self._pids if not pid_alive(pid)]
        if dead:
            raise WorkerDiedError(f"worker process {dead[0]} died")

    def shutdown(self) -> None:
        self._plans.put(Shutdown())
        self._stopped.set()
        self._thread.join(timeout=2.0)
        self._interrupts.close()

    def _serve(self) -> None:
        """Strictly one plan in flight: readies first, then plan → result, plan → result."""
        try:
            for _ in range(self._num_workers):
                self._receive_one()
            while not self._stopped.is_set():
                try:
                    message = self._plans.get(timeout=POLL_MS / 1000)
                except queue.Empty:
                    continue
                self._broadcast(message)
                if isinstance(message, Shutdown):
                    return
                self._receive_one()
        finally:
            self._socket.close()

    def _broadcast(self, message: CoreToWorker) -> None:
        frames = self._encoder.encode(message)
        for rank in range(self._num_workers):
            try:
                self._socket.send_multipart([f"rank{rank}".encode(), *frames], copy=False)
            except zmq.ZMQError as error:
                logger.error("cannot reach worker rank %d: %s", rank, error)

    def _receive_one(self) -> None:
        while not self._stopped.is_set():
            if self._socket.poll(POLL_MS) and self._receive():
                return

    def _receive(self) -> bool:
        _, *frames = self._socket.recv_multipart(copy=False)
        try:
            message = self._decoder.decode([f.buffer for f in frames])
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError) as error:
            logger.error("dropped a malformed frame from a worker: %s", error)
            return False
        (self._readies if isinstance(message, WorkerReady) else self._events).put(message)
        return True
