"""A fake core for frontend tests: answers the hello, echoes prompts back as outputs, answers calls.

Behaviour by request: the output tokens are the prompt's tokens, one per `CoreOutputs`, ending
with "length" after `max_tokens`; a request whose user id starts with "slow" streams the
prompt over and over until it is aborted (final output "abort"). Utility methods:
"echo" returns its decoded args, "get_state" an EngineState, "hang" never answers, others fail.
"""

import threading
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig
from protocol.messages import (
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutput,
    CoreOutputs,
    EngineReady,
    EngineState,
    FrontendHello,
    UtilityCall,
    UtilityResult,
)

MAX_MODEL_LEN = 64


@dataclass
class _Running:
    request: AddRequest
    sent: int = 0


@dataclass
class FakeCore:
    config: EngineConfig
    received: list[object] = field(default_factory=list)
    _running: dict[str, _Running] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def aborted_ids(self) -> list[str]:
        return [i for m in list(self.received) if isinstance(m, AbortRequests) for i in m.request_ids]

    def added(self) -> list[AddRequest]:
        return [m for m in list(self.received) if isinstance(m, AddRequest)]

    def _serve(self) -> None:
        context = zmq.Context()
        inputs = context.socket(zmq.ROUTER)
        outputs = context.socket(zmq.ROUTER)
        outputs.setsockopt(zmq.ROUTER_MANDATORY, 1)
        inputs.bind(self.config.core_input_address)
        outputs.bind(self.config.core_output_address)
        encoder, decoder = Encoder(), Decoder(CoreInput)

        def send(identity: bytes, message: object) -> None:
            for _ in range(100):  # the output DEALER may still be connecting
                try:
                    outputs.send_multipart([identity, *encoder.encode(message)])
                    return
                except zmq.ZMQError:
                    time.sleep(0.02)

        try:
            while not self._stop.is_set():
                if inputs.poll(20):
                    identity, *frames = inputs.recv_multipart()
                    message = decoder.decode(frames)
                    self.received.append(message)
                    self._handle(identity, message, send)
                self._step(send)
        finally:
            context.destroy(linger=0)

    def _handle(self, identity: bytes, message: object, send) -> None:
        match message:
            case FrontendHello():
                send(identity, EngineReady(max_model_len=MAX_MODEL_LEN, num_kv_blocks=100, block_size=16))
            case AddRequest():
                self._running[message.request_id] = _Running(message)
            case AbortRequests(request_ids=ids):
                done = [self._running.pop(i) for i in ids if i in self._running]
                if done:
                    send(identity, CoreOutputs([CoreOutput(r.request.request_id, finish_reason="abort") for r in done]))
            case UtilityCall(method="hang"):
                pass
            case UtilityCall():
                send(identity, self._utility(message))

    def _utility(self, call: UtilityCall) -> UtilityResult:
        if call.method == "echo":
            return UtilityResult(call.call_id, value=msgspec.msgpack.decode(call.args) if call.args else None)
        if call.method == "get_state":
            state = EngineState("running", None, len(self._running), 0, 0, 0, 90, 100)
            return UtilityResult(call.call_id, value=msgspec.to_builtins(state))
        return UtilityResult(call.call_id, error_kind="utility", error=f"unknown method {call.method}")

    def _step(self, send) -> None:
        outputs: list[CoreOutput] = []
        for rid, run in list(self._running.items()):
            request = run.request
            slow = request.user_request_id.startswith("slow")
            token = request.prompt_token_ids[run.sent % len(request.prompt_token_ids)]
            run.sent += 1
            last = not slow and (run.sent >= request.sampling.max_tokens or run.sent >= len(request.prompt_token_ids))
            outputs.append(CoreOutput(rid, [token], finish_reason="length" if last else None,
                                      num_prompt_tokens=len(request.prompt_token_ids)))
            if last:
                del self._running[rid]
        if outputs:
            send(b"frontend-0", CoreOutputs(outputs))
