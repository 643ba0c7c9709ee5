"""Talking to the worker ranks: every rank gets every plan and command; rank 0 answers a plan
with its result, every rank answers a command (weights, weight groups, sleep).

A thread owns the socket. The loop submits a plan or command and the answers arrive on the
loop's own event queue, beside the frontends' inputs, so the loop serves inputs meanwhile.
"""

import logging
import queue
import threading
import time
from typing import Callable, Sequence

import msgspec
import zmq

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig
from protocol.process import make_socket, pid_alive
from protocol.step import CoreToWorker, InterruptStep, Shutdown, StepPlan, WorkerReady, WorkerToCore
from protocol.weights import WorkerCommand, WorkerReply

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

    @property
    def num_workers(self) -> int:
        return self._num_workers

    def submit(self, message: StepPlan | WorkerCommand) -> None:
        """Run a step (its `StepResult` arrives on the events queue) or a command (each rank's
        `WorkerReply` does)."""
        self._plans.put(message)

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
        """Strictly one message in flight: readies first, then plan → result, command → replies."""
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
                for _ in range(1 if isinstance(message, StepPlan) else self._num_workers):
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


class WorkerOps:
    """Commands every rank answers: `on_done` gets the replies, in rank order, once all came.
    Used from the loop's thread only."""

    def __init__(self, submit: Callable[[WorkerCommand], None], num_ranks: int) -> None:
        self._submit = submit
        self._num_ranks = num_ranks
        self._pending: dict[int, tuple[list[WorkerReply], Callable[[list[WorkerReply]], None]]] = {}
        self._next_op_id = 0

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    @property
    def num_ranks(self) -> int:
        return self._num_ranks

    def run(self, make: Callable[[int], WorkerCommand], on_done: Callable[[list[WorkerReply]], None]) -> int:
        """Send `make(op_id)` to every rank; returns the op id."""
        op_id = self._next_op_id
        self._next_op_id += 1
        self._pending[op_id] = ([], on_done)
        self._submit(make(op_id))
        return op_id

    def on_reply(self, reply: WorkerReply) -> None:
        entry = self._pending.get(reply.op_id)
        if entry is None:
            logger.error("dropped a reply to command %d, which is not running", reply.op_id)
            return
        replies, on_done = entry
        replies.append(reply)
        if len(replies) == self._num_ranks:
            del self._pending[reply.op_id]
            on_done(sorted(replies, key=lambda r: r.rank))


def first_error(replies: list[WorkerReply]) -> str | None:
    """The first rank's error; named by rank where the ranks did not all fail alike."""
    errors = [r for r in replies if r.error]
    if not errors:
        return None
    if len(errors) == len(replies) and len({r.error for r in errors}) == 1:
        return errors[0].error
    return f"rank {errors[0].rank}: {errors[0].error}"
