"""The client-facing ROUTER: generate requests in, output deltas out, utility calls both ways.

A request is checked (and tokenized) here; bad input gets `StreamError(kind="invalid")` and
never reaches the core. A prompt longer than `max_model_len`, or a `max_tokens` above it, is an
error; otherwise `max_tokens` is capped to the room left (`max_model_len - prompt tokens`), so a
request that would overrun the context finishes with "length" where the context ends. Outputs go to each
client in the order the core sent them: one `StreamOutputs` per client per `CoreOutputs`.
"""

import itertools
import logging
import time
from collections import defaultdict
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from protocol.codec import Decoder, Encoder
from protocol.errors import EngineDeadError, InvalidRequestError, error_kind
from protocol.messages import (
    AddRequest,
    CallResult,
    CancelStream,
    ClientCall,
    ClientMessage,
    CoreOutput,
    EngineReady,
    GenerateRequest,
    SamplingParams,
    StreamError,
    StreamOutput,
    StreamOutputs,
    validate_sampling,
)

from frontend.core_client import CoreClient
from frontend.detokenizer import Detokenizer
from frontend.request_state import RequestState, StreamKey
from frontend.sockets import send_now
from frontend.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Timings(Protocol):
    """Told each request's time to its first token, and the time between its later outputs."""

    def first_token(self, seconds: float) -> None: ...

    def next_output(self, seconds: float) -> None: ...


class Server:
    """Owns the open streams of every client of this frontend."""

    def __init__(
        self, sock: zmq.asyncio.Socket, core: CoreClient, tokenizer: Tokenizer, limits: EngineReady,
        timings: Timings | None = None,
    ):  # fmt: skip
        self._sock = sock
        self._core = core
        self._tokenizer = tokenizer
        self._limits = limits
        self.timings = timings
        self._encoder = Encoder()
        self._decoder = Decoder(ClientMessage)
        self._states: dict[str, RequestState] = {}
        self._by_stream: dict[StreamKey, str] = {}
        self._ids = itertools.count()

    async def run(self) -> None:
        while True:
            # Not copied: a weight chunk's tensors go on to the core from the received buffers.
            identity, *frames = await self._sock.recv_multipart(copy=False)
            self._handle(identity.bytes, [frame.buffer for frame in frames])

    def _handle(self, client: bytes, frames: list[memoryview]) -> None:
        try:
            message = self._decoder.decode(frames)
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError) as error:
            logger.warning("malformed frame from client %s: %s", client.hex(), error)
            self._answer_malformed(client, frames, str(error))
            return
        match message:
            case GenerateRequest():
                self._generate(client, message)
            case CancelStream(stream_id=stream_id):
                self._cancel(StreamKey(client, stream_id))
            case ClientCall():
                self._call(client, message)

    def _generate(self, client: bytes, request: GenerateRequest) -> None:
        key = StreamKey(client, request.stream_id)
        try:
            if key in self._by_stream:
                raise InvalidRequestError(f"stream id {request.stream_id} is already open")
            prompt_ids = self._prompt_ids(request)
            sampling = self._checked_sampling(request.sampling, len(prompt_ids))
            request_id = f"{self._core.index}-{next(self._ids)}"
            # Without an id of the user's, the internal one is shown and abort() takes it.
            user_request_id = request.request_id or request_id
            self._core.add_request(
                AddRequest(
                    request_id=request_id,
                    user_request_id=user_request_id,
                    client_index=self._core.index,
                    prompt_token_ids=prompt_ids,
                    sampling=sampling,
                    eos_token_ids=self._tokenizer.eos_token_ids,
                    cache_salt=request.cache_salt,
                    hold_while_paused=request.hold_while_paused,
                )
            )
        except (InvalidRequestError, EngineDeadError) as error:
            self._send(client, StreamError(request.stream_id, error_kind(error), str(error)))
            return
        self._states[request_id] = RequestState(
            request_id=request_id,
            user_request_id=user_request_id,
            stream=key,
            detokenizer=Detokenizer(self._tokenizer.backend, sampling.stop, sampling.skip_special_tokens,
                                    sampling.include_stop_str_in_output),  # fmt: skip
            num_prompt_tokens=len(prompt_ids),
            min_tokens=sampling.min_tokens,
            stop_token_ids=frozenset(sampling.stop_token_ids)
            | frozenset([] if sampling.ignore_eos else self._tokenizer.eos_token_ids),
        )
        self._by_stream[key] = request_id

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        forms = [f for f in (request.prompt, request.messages, request.token_ids) if f is not None]
        if len(forms) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or token_ids")
        try:
            if request.prompt is not None:
                ids = self._tokenizer.encode_prompt(request.prompt)
            elif request.messages is not None:
                ids = self._tokenizer.encode_chat([msgspec.to_builtins(m) for m in request.messages])
            else:
                ids = list(request.token_ids or [])
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        bad = [t for t in ids if not 0 <= t < self._tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is out of the vocabulary (0..{self._tokenizer.vocab_size - 1})"
            )
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def _checked_sampling(self, sampling: SamplingParams, num_prompt: int) -> SamplingParams:
        try:
            validate_sampling(sampling)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        max_len = self._limits.max_model_len
        if sampling.max_tokens > max_len:
            raise InvalidRequestError(f"max_tokens {sampling.max_tokens} is more than max_model_len {max_len}")
        if num_prompt >= max_len:
            raise InvalidRequestError(
                f"prompt has {num_prompt} tokens, more than max_model_len {max_len} allows "
                f"({max_len - 1}, to leave room for output)"
            )
        room = max_len - num_prompt
        if sampling.max_tokens > room:
            return msgspec.structs.replace(sampling, max_tokens=room)
        return sampling

    def _cancel(self, key: StreamKey) -> None:
        request_id = self._by_stream.pop(key, None)
        if request_id is not None:
            self._states.pop(request_id, None)
            self._core.abort([request_id])

    def _call(self, client: bytes, call: ClientCall) -> None:
        future = self._core.call(call.method, call.args, call.tensors)
        future.add_done_callback(
            lambda done: self._send(client, _call_result(call.call_id, done.exception(), done))
        )

    def on_outputs(self, outputs: list[CoreOutput]) -> None:
        """Detokenize one batch from the core and forward it, one message per client."""
        batches: dict[bytes, list[StreamOutput]] = defaultdict(list)
        stopped: list[str] = []
        now = time.monotonic()
        for out in outputs:
            state = self._states.get(out.request_id)
            if state is None:  # finished here (stop string), cancelled, or unknown
                continue
            if self.timings is not None and out.new_token_ids:
                self._time(state, now)
            if out.error_kind is not None:  # refused by the core with a typed error
                self._forget(state)
                self._send(state.stream.client, StreamError(state.stream.stream_id, out.error_kind, out.error or ""))
                continue
            update = state.update(out)
            batches[state.stream.client].append(StreamOutput(state.stream.stream_id, update.output))
            if update.stopped_by_string:
                stopped.append(state.request_id)
            if state.finished:
                self._forget(state)
        self._core.abort(stopped)
        for client, items in batches.items():
            self._send(client, StreamOutputs(items))

    def _time(self, state: RequestState, now: float) -> None:
        if state.last_output is None:
            self.timings.first_token(now - state.arrived)
        else:
            self.timings.next_output(now - state.last_output)
        state.last_output = now

    def on_core_dead(self, reason: str) -> None:
        """Every open stream ends with an EngineDeadError."""
        self.fail_all(f"engine core died: {reason}")

    def fail_all(self, message: str) -> None:
        states = list(self._states.values())
        self._states.clear()
        self._by_stream.clear()
        for state in states:
            self._send(state.stream.client, StreamError(state.stream.stream_id, "dead", message))

    def _forget(self, state: RequestState) -> None:
        self._states.pop(state.request_id, None)
        self._by_stream.pop(state.stream, None)

    def _send(self, client: bytes, message: Any) -> None:
        try:
            send_now(self._sock, [client, *self._encoder.encode(message)])
        except zmq.ZMQError as error:  # ROUTER_MANDATORY: the client is gone
            logger.warning("client %s unreachable (%s): aborting its streams", client.hex(), error)
            gone = [key for key in self._by_stream if key.client == client]
            for key in gone:
                self._cancel(key)

    def _answer_malformed(self, client: bytes, frames: list[memoryview], error: str) -> None:
        """Answer a frame that did not decode, when its tag and id can still be read."""
        try:
            raw = msgspec.msgpack.decode(frames[0])
        except (msgspec.DecodeError, IndexError):
            return
        if not (isinstance(raw, list) and len(raw) > 1 and isinstance(raw[1], int)):
            return
        if raw[0] == "generate":
            self._send(client, StreamError(raw[1], "invalid", f"malformed request: {error}"))
        elif raw[0] == "call":
            self._send(client, CallResult(raw[1], error_kind="invalid", error=error))


def _call_result(call_id: int, error: BaseException | None, done: Any) -> CallResult:
    if error is not None:
        return CallResult(call_id, error_kind=error_kind(error), error=str(error))
    return CallResult(call_id, value=done.result())
