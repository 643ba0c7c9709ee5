"""One request as the frontend sees it: who owns it, its detokenizer and its counters.

Each `CoreOutput` becomes one `RequestOutput` delta for the client. Exactly one delta per
request is final (`finish_reason` set); outputs that arrive after it are ignored by the caller.
"""

import time
from dataclasses import dataclass, field

from protocol.messages import CoreOutput, RequestOutput

from frontend.detokenizer import Detokenizer


@dataclass(frozen=True)
class StreamKey:
    """A client's stream: the client's socket identity and its stream id."""

    client: bytes
    stream_id: int


@dataclass(frozen=True)
class OutputUpdate:
    """A delta for the client; `stopped_by_string` means the core must be told to abort it."""

    output: RequestOutput
    stopped_by_string: bool


@dataclass
class RequestState:
    request_id: str
    user_request_id: str
    stream: StreamKey
    detokenizer: Detokenizer
    num_prompt_tokens: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    min_tokens: int = 0  # stop strings count from this many output tokens on
    arrived: float = field(default_factory=time.monotonic)
    last_output: float | None = None  # when its last output with tokens came (latency metrics)
    num_output_tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False

    def update(self, out: CoreOutput) -> OutputUpdate:
        """The client's delta for one core output; marks the request finished when it is final."""
        self.num_output_tokens += len(out.new_token_ids)
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        delta = self.detokenizer.push(self._ids_to_show(out), check_stops=self.num_output_tokens >= self.min_tokens)
        finish_reason, text = out.finish_reason, delta.text
        if delta.stopped:
            finish_reason = "stop"
        elif finish_reason is not None:
            text += self.detokenizer.flush()
        self.finished = finish_reason is not None
        output = RequestOutput(
            request_id=self.user_request_id,
            text=text,
            token_ids=list(out.new_token_ids),
            logprobs=out.new_logprobs,
            finish_reason=finish_reason,
            error=out.error,
            num_prompt_tokens=out.num_prompt_tokens or self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            cached_tokens=self.cached_tokens,
            weight_version=out.weight_version,
            weight_versions=out.weight_versions,
            prompt_logprobs=out.prompt_logprobs,
        )
        return OutputUpdate(output, stopped_by_string=delta.stopped and not out.finish_reason)

    def _ids_to_show(self, out: CoreOutput) -> list[int]:
        """The new ids to detokenize: a final stop or EOS token is counted but never shown as text."""
        ids = out.new_token_ids
        if out.finish_reason == "stop" and ids and ids[-1] in self.stop_token_ids:
            return ids[:-1]
        return ids
