"""The core's busy loop: take inputs, schedule a step, run it on the workers, emit outputs.

    plan = scheduler.schedule(); workers.submit(plan); result = await_result(); emit(scheduler.update(plan, result))

Only one queue is touched here: frontends' inputs, the workers' step results and their replies
to commands arrive on it from the threads of `io.py` and `workers.py`. Inputs are applied while
a step runs, so control calls are answered without waiting for the step (a pause(keep) still
answers only after it).
"""

import logging
import queue
import time
from collections import defaultdict
from typing import Any, Callable

import msgspec

from core.io import OutputThread
from core.pause import PauseState, Waiter
from core.profile import StepProfiler
from core.request import Request
from core.scheduler import RoutedOutput, ScheduledStep, Scheduler
from core.sleep import SleepState
from core.utility import error_result, run_utility
from core.weights import WeightUpdates
from core.workers import WorkerDiedError, WorkerGroup, WorkerOps, first_error
from protocol.errors import UtilityError
from protocol.messages import (
    AbortFence,
    AbortFenceAck,
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutputs,
    EngineReady,
    EngineState,
    FrontendHello,
    UtilityCall,
    UtilityResult,
)
from protocol.step import StepResult
from protocol.process import pid_alive
from protocol.weights import KvMode, WorkerCommand, WorkerReply

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
# An idle engine's first step waits for the rest of a burst of inputs (requests submitted together,
# an RL rollout's batch): until none came for BURST_GAP_S, BURST_MAX_S at most. The benchmark's 32
# requests came up to 3.4 ms apart (AVX-512 EPYC): a 5 ms gap split them into two steps now and then.
BURST_GAP_S = 0.015
BURST_MAX_S = 0.05
FRONTEND_CHECK_S = 0.5
STEP_TIMEOUT_S = 600.0


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        workers: WorkerGroup,
        inbox: "queue.Queue[CoreInput | StepResult]",
        output: OutputThread,
        ready: EngineReady,
        reject_while_paused: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.inbox = inbox
        self.output = output
        self.ready = ready
        self.reject_while_paused = reject_while_paused
        self.pause = PauseState()
        self.ops = WorkerOps(workers.submit, workers.num_workers)
        self.weights = WeightUpdates(self)
        self.sleep = SleepState(self)
        self.frontend_pids: dict[int, int] = {}  # client_index -> pid (0: not watched)
        self.fences: dict[int, int] = {}  # client_index -> the AbortFence it has not acknowledged
        self.next_fence_id = 0
        self.next_frontend_check = 0.0
        self.step_in_flight: int | None = None  # the id of the step the workers are running
        self.profiler: StepProfiler | None = None  # between start_profile and stop_profile
        self.running = True

    def run(self) -> None:
        while self.running:
            idle = not self._can_step()
            self.handle_inputs(block=idle)
            if idle and self._can_step():
                self.gather_burst()
            self.check_peers()
            self.weights.poll()
            started = time.perf_counter()
            step = self.scheduler.schedule(self.pause.admits_new, self.pause.runs_running)
            if step is None:
                continue
            self.run_step(step, schedule_s=time.perf_counter() - started)
            self.settle_pause()
            self.weights.poll()  # an atomic update may wait for this step

    def run_step(self, step: ScheduledStep, schedule_s: float) -> None:
        """Run the plan on the workers and emit what it produced; timed while profiling."""
        step.plan.profile = self.profiler is not None
        submitted = time.perf_counter()
        self.workers.submit(step.plan)
        result = self.await_result(step.plan.step_id)
        answered = time.perf_counter()
        if result.error:
            logger.error("step %d failed on the workers: %s", result.step_id, result.error)
            self.emit(self.scheduler.fail_step(step, result.error))
        elif result.interrupted:
            logger.debug("step %d interrupted: its tokens run again after the pause", result.step_id)
        else:
            self.emit(self.scheduler.update(step, result))
        if self.profiler is not None:
            outputs_s = time.perf_counter() - answered
            self.profiler.add(step.plan, result.seconds, schedule_s, answered - submitted, outputs_s)

    def await_result(self, step_id: int) -> StepResult:
        """Serve inputs until the step's result arrives. An abort received during the step wins
        over its output: the request is finished now, and `update` skips it."""
        self.step_in_flight = step_id
        deadline = time.monotonic() + STEP_TIMEOUT_S
        try:
            while True:
                try:
                    event = self.inbox.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    event = None
                if isinstance(event, StepResult):
                    if event.step_id != step_id:
                        raise WorkerDiedError(f"the workers answered step {event.step_id}, expected {step_id}")
                    return event
                if event is not None:
                    self.handle(event)
                    self.emit(self.scheduler.take_finished_outputs())
                self.check_workers(deadline)
        finally:
            self.step_in_flight = None

    def check_workers(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise WorkerDiedError("no step result from the workers in time")
        self.workers.check_alive()

    def _can_step(self) -> bool:
        """Whether a step could run now (else the loop waits for input)."""
        return bool(self.scheduler.running and self.pause.runs_running) or bool(
            self.scheduler.waiting and self.pause.admits_new
        )

    def handle_inputs(self, block: bool) -> None:
        """Apply every queued input; when `block`, wait a while for the first one."""
        try:
            message = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.apply(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def gather_burst(self) -> None:
        """Inputs that arrive close behind the one that woke an idle engine join its first step.
        The requests of one burst reach the core over a few ms (the frontend forwards them one by
        one); a step started on the first of them held the others back for its whole length (the
        benchmark's 32: a first step of 3 requests, 1.2 s, before the other 29's)."""
        deadline = time.monotonic() + BURST_MAX_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.inbox.get(timeout=min(BURST_GAP_S, left))
            except queue.Empty:
                return
            self.apply(message)

    def apply(self, message: CoreInput | StepResult) -> None:
        self.handle(message)
        # Outputs of requests this input finished go out before anything it answers later.
        self.emit(self.scheduler.take_finished_outputs())
        # An abort may have ended the last running request a pause(wait) waits for.
        self.settle_pause()

    def handle(self, message: CoreInput | StepResult) -> None:
        match message:
            case AddRequest():
                self.add_request(message)
            case AbortRequests():
                self.scheduler.abort(message.request_ids)
            case UtilityCall():
                result = run_utility(self, message)
                # Outputs of requests the call finished go out before its answer.
                self.emit(self.scheduler.take_finished_outputs())
                if result is not None:
                    self.output.send(message.client_index, result)
            case AbortFenceAck(client_index=client_index, fence_id=fence_id):
                if self.fences.get(client_index) == fence_id:
                    del self.fences[client_index]
            case WorkerReply():
                self.ops.on_reply(message)
            case FrontendHello():
                logger.info("frontend %d connected (pid %d)", message.client_index, message.pid)
                self.frontend_pids[message.client_index] = message.pid
                self.fences.pop(message.client_index, None)  # a new frontend under this index
                self.output.send(message.client_index, self.ready)
            case StepResult():
                logger.error("dropped the result of step %d: no step is in flight", message.step_id)

    def add_request(self, message: AddRequest) -> None:
        request = Request.from_message(message)
        problem = self._check(message)
        if problem:
            logger.warning("rejected request %s: %s", message.request_id, problem)
            self.scheduler.reject(request, problem)
        elif message.client_index in self.fences:
            # Sent before its frontend learned that everything was aborted: aborted like the rest.
            # The fence goes again, in case the first one was lost; acks match it by id.
            self.scheduler.add(request)
            self.scheduler.abort([request.request_id])
            self.output.send(message.client_index, AbortFence(self.fences[message.client_index]))
        elif self.reject_while_paused and not self.pause.admits_new and not message.hold_while_paused:
            self.scheduler.reject(request, f"the engine is {self.pause.status}: retry after resume", "paused")
        else:
            self.scheduler.add(request)

    def fence_frontends(self) -> None:
        """After aborting everything: requests still on their way from any frontend are aborted
        when they arrive, until that frontend acknowledges the fence (see `AbortFence`)."""
        self.next_fence_id += 1
        for client_index in self.frontend_pids:
            self.fences[client_index] = self.next_fence_id
            self.output.send(client_index, AbortFence(self.next_fence_id))

    def check_peers(self) -> None:
        """A dead frontend does not take the core down: its requests are aborted and their
        blocks freed. A dead worker does, also while a command waits for it (checked at most
        every FRONTEND_CHECK_S)."""
        now = time.monotonic()
        if now < self.next_frontend_check:
            return
        self.next_frontend_check = now + FRONTEND_CHECK_S
        if self.ops.busy:
            self.workers.check_alive()
        for client_index, pid in list(self.frontend_pids.items()):
            if pid and not pid_alive(pid):
                del self.frontend_pids[client_index]
                self.fences.pop(client_index, None)
                aborted = self.scheduler.abort_frontend(client_index)
                self.scheduler.take_finished_outputs()  # nobody is left to read them
                self.weights.abandon_frontend(client_index)
                self.settle_pause()
                # With nothing in flight nothing was lost: the supervisor stops the frontends
                # before the core, whose check may see one gone before its own signal arrives.
                log = logger.error if aborted else logger.warning
                log("frontend %d (pid %d) died: aborted its %d request(s)", client_index, pid, len(aborted))

    def interrupt_step(self) -> None:
        """A pause that freezes or aborts everything need not wait for the step in flight: the
        workers abandon it between two layers (where their forward can) and it runs again later."""
        if self.step_in_flight is not None:
            self.workers.interrupt(self.step_in_flight)

    def settle_pause(self) -> None:
        """Answer the pause calls whose state has been reached (never while a forward runs)."""
        if self.step_in_flight is not None:
            return
        waiters = self.pause.settle(len(self.scheduler.running))
        if self.pause.status == "paused" and self.pause.retract:
            self.pause.retract = False
            self.scheduler.recompute_running()
        for waiter in waiters:
            self.answer(waiter, self.state())

    def answer(self, waiter: Waiter, value: Any, error: Exception | None = None) -> None:
        """The result of a call answered later (a pause, a weight update, a command)."""
        if error is not None:
            self.output.send(waiter.client_index, error_result(waiter.call_id, error))
        else:
            self.output.send(waiter.client_index, UtilityResult(waiter.call_id, msgspec.to_builtins(value)))

    def run_on_workers(
        self, make: Callable[[int], WorkerCommand], caller: Waiter, succeeded: Callable[[], None] = lambda: None
    ) -> None:
        """Send a command to every rank; once all succeeded, `succeeded()` and `caller` gets the
        state, else the first error."""

        def done(replies: list[WorkerReply]) -> None:
            error = first_error(replies)
            if error is None:
                succeeded()
            self.answer(caller, self.state(), None if error is None else UtilityError(error))

        self.ops.run(make, done)

    def resume_problem(self) -> str | None:
        """Why resume must be refused now, or None."""
        if self.weights.broken is not None:
            return (f"the last weight update failed part-way ({self.weights.broken}) and the old weights "
                    "could not be restored: update_weights must succeed before resume")  # fmt: skip
        if self.sleep.asleep:
            return f"the engine is asleep ({', '.join(sorted(self.sleep.asleep))}): wake_up() before resume()"
        return None

    def resume(self, kv: KvMode) -> None:
        """Run again; with kv="recompute", requests a pause(keep) froze prefill their tokens again
        (their KV came from weights since replaced). Pending pause(wait) calls are cancelled."""
        if kv == "recompute" and not self.pause.runs_running:
            logger.info("recomputing the KV of %d frozen request(s)", self.scheduler.recompute_running())
        for waiter in self.pause.resume():
            self.answer(waiter, None, UtilityError("pause(wait) was cancelled by resume"))

    def state(self) -> EngineState:
        """The engine's state and counts: frozen are running requests a pause(keep) holds; held
        are waiting requests a pause holds."""
        scheduler, pause = self.scheduler, self.pause
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        return EngineState(
            state=pause.status,
            mode=pause.mode,
            num_running=running if pause.runs_running else 0,
            num_frozen=0 if pause.runs_running else running,
            num_held=0 if pause.admits_new else waiting,
            num_waiting=waiting if pause.admits_new else 0,
            num_free_blocks=scheduler.pool.num_free,
            num_total_blocks=scheduler.pool.num_blocks,
            weight_version=scheduler.weight_version,
            num_preemptions=scheduler.num_preemptions,
            updating_weights=self.weights.busy,
            weights_error=self.weights.broken,
            sleeping=sorted(self.sleep.asleep),
            num_workers=self.ops.num_ranks,
            weight_groups=sorted(self.weights.groups),
            prompt_tokens_total=scheduler.counters.prompt_tokens,
            cached_prompt_tokens_total=scheduler.counters.cached_prompt_tokens,
            generation_tokens_total=scheduler.counters.generation_tokens,
        )

    def _check(self, message: AddRequest) -> str | None:
        num_tokens = len(message.prompt_token_ids)
        if num_tokens == 0:
            return "the prompt is empty"
        if num_tokens >= self.ready.max_model_len:
            return f"prompt has {num_tokens} tokens, max_model_len is {self.ready.max_model_len}"
        if message.request_id in self.scheduler.requests:
            return f"request id {message.request_id} is already in use"
        return None

    def emit(self, outputs: list[RoutedOutput]) -> None:
        """One `CoreOutputs` per frontend, in the order the outputs were made."""
        by_frontend: dict[int, list] = defaultdict(list)
        for client_index, output in outputs:
            by_frontend[client_index].append(output)
        for client_index, items in by_frontend.items():
            self.output.send(client_index, CoreOutputs(items))
