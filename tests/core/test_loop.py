"""The engine loop's output order, in-process: no sockets, no workers, no step run."""

import queue
import threading
import time

from core.block_pool import BlockPool
from core import loop as core_loop
from core.loop import EngineLoop
from core.scheduler import Scheduler, SchedulerLimits
from protocol.codec import encode_args
from protocol.messages import (
    AbortFence,
    AddRequest,
    CoreOutputs,
    EngineReady,
    FrontendHello,
    PauseArgs,
    SamplingParams,
    UtilityCall,
    UtilityResult,
)


class RecordingOutput:
    """Stands in for the output thread: what the loop sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, object]] = []

    def send(self, client_index: int, message: object) -> None:
        self.sent.append((client_index, message))


class RecordingWorkers:
    """Stands in for the worker ranks: what the loop submitted, in order; nothing answers."""

    def __init__(self, num_workers: int = 1) -> None:
        self.num_workers = num_workers
        self.submitted: list[object] = []

    def submit(self, message: object) -> None:
        self.submitted.append(message)

    def interrupt(self, step_id: int) -> None:
        pass

    def check_alive(self) -> None:
        pass


def make_loop(output: RecordingOutput, inbox: queue.Queue, workers: RecordingWorkers | None = None) -> EngineLoop:
    scheduler = Scheduler(BlockPool(64, 4), SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64))
    ready = EngineReady(max_model_len=64, num_kv_blocks=64, block_size=4)
    return EngineLoop(scheduler, workers or RecordingWorkers(), inbox, output, ready)


def add(i: int) -> AddRequest:
    return AddRequest(f"0-{i}", f"user-{i}", 0, [1, 2, 3], SamplingParams(max_tokens=4))


def test_pause_abort_answers_after_the_final_outputs_when_no_step_runs():
    """Requests and the pause arrive together, before any step: the aborted requests' final
    outputs still go out before the pause's answer on the caller's stream."""
    inbox: queue.Queue = queue.Queue()
    output = RecordingOutput()
    loop = make_loop(output, inbox)
    for message in [FrontendHello(0), add(0), add(1), UtilityCall(0, 7, "pause", encode_args(PauseArgs("abort")))]:
        inbox.put(message)
    loop.handle_inputs(block=False)
    kinds = [type(message) for _, message in output.sent]
    assert kinds == [EngineReady, AbortFence, CoreOutputs, UtilityResult]
    finals = output.sent[2][1].outputs
    assert [(o.request_id, o.finish_reason) for o in finals] == [("0-0", "abort"), ("0-1", "abort")]
    assert output.sent[3][1].call_id == 7 and output.sent[3][1].error is None


def test_an_idle_loop_takes_a_burst_of_requests_into_one_step(monkeypatch):
    """Requests a few ms apart reach an idle loop together; one after a longer quiet waits."""
    monkeypatch.setattr(core_loop, "BURST_GAP_S", 0.1)
    monkeypatch.setattr(core_loop, "BURST_MAX_S", 2.0)
    inbox: queue.Queue = queue.Queue()
    loop = make_loop(RecordingOutput(), inbox)
    inbox.put(FrontendHello(0))

    def submit() -> None:
        for i in range(3):
            inbox.put(add(i))
            time.sleep(0.01)
        time.sleep(0.5)
        inbox.put(add(3))

    feeder = threading.Thread(target=submit)
    feeder.start()
    try:
        loop.handle_inputs(block=True)
        loop.gather_burst()
        assert [r.request_id for r in loop.scheduler.waiting] == ["0-0", "0-1", "0-2"]
    finally:
        feeder.join()


def test_a_burst_is_gathered_for_burst_max_at_most(monkeypatch):
    monkeypatch.setattr(core_loop, "BURST_GAP_S", 0.2)
    monkeypatch.setattr(core_loop, "BURST_MAX_S", 0.3)
    inbox: queue.Queue = queue.Queue()
    loop = make_loop(RecordingOutput(), inbox)
    stop = threading.Event()

    def submit() -> None:
        for i in range(100):
            inbox.put(add(i))
            if stop.wait(0.02):
                return

    feeder = threading.Thread(target=submit)
    feeder.start()
    try:
        started = time.monotonic()
        loop.gather_burst()
        assert 0.3 <= time.monotonic() - started < 1.0
    finally:
        stop.set()
        feeder.join()
