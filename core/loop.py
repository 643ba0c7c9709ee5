"""The core's busy loop: take inputs, schedule a step, run it on the workers, emit outputs.

    plan = scheduler.schedule(); result = workers.execute(plan); emit(scheduler.update(plan, result))

Only queues are touched here: sockets live on the threads of `io.py` and `workers.py`.
"""

import logging
import queue
from collections import defaultdict

from core.io import OutputThread
from core.request import Request
from core.scheduler import RoutedOutput, Scheduler
from core.utility import run_utility
from core.workers import WorkerGroup
from protocol.messages import (
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutputs,
    EngineReady,
    FrontendHello,
    UtilityCall,
)

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        workers: WorkerGroup,
        inbox: "queue.Queue[CoreInput]",
        output: OutputThread,
        ready: EngineReady,
    ) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.inbox = inbox
        self.output = output
        self.ready = ready
        self.running = True

    def run(self) -> None:
        while self.running:
            self.handle_inputs(block=not self.scheduler.has_work)
            step = self.scheduler.schedule()
            if step is None:
                continue
            result = self.workers.execute(step.plan)
            # An abort received during the step wins: it is applied before outputs are built.
            self.handle_inputs(block=False)
            if result.error:
                logger.error("step %d failed on the workers: %s", result.step_id, result.error)
                self.emit(self.scheduler.fail_step(step, result.error))
            else:
                self.emit(self.scheduler.update(step, result))

    def handle_inputs(self, block: bool) -> None:
        """Apply every queued input; when `block`, wait a while for the first one."""
        try:
            message = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.handle(message)
            # Outputs of requests this input finished go out before anything it answers later.
            self.emit(self.scheduler.take_finished_outputs())
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def handle(self, message: CoreInput) -> None:
        match message:
            case AddRequest():
                self.add_request(message)
            case AbortRequests():
                self.scheduler.abort(message.request_ids)
            case UtilityCall():
                self.output.send(message.client_index, run_utility(self, message))
            case FrontendHello():
                logger.info("frontend %d connected", message.client_index)
                self.output.send(message.client_index, self.ready)

    def add_request(self, message: AddRequest) -> None:
        request = Request.from_message(message)
        problem = self._check(message)
        if problem:
            logger.warning("rejected request %s: %s", message.request_id, problem)
            self.scheduler.reject(request, problem)
        else:
            self.scheduler.add(request)

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
