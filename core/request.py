"""The core's view of one request: its tokens, how far their KV is computed, its blocks."""

import enum
from dataclasses import dataclass, field
from typing import Optional

from protocol.messages import AddRequest, FinishReason, Logprobs, SamplingParams, WeightSpan


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """| computed (KV in blocks) | scheduled | not yet computed |  over `all_token_ids`.

    The worker knows the request from its `NewRequest` on; `unsent_token_ids` are the tokens
    appended since (sent with the next step), `num_blocks_sent` how many block ids it has."""

    request_id: str
    user_request_id: str
    client_index: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    all_token_ids: list[int]
    num_prompt_tokens: int
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_blocks_cached: int = 0
    known_to_workers: bool = False
    unsent_token_ids: list[int] = field(default_factory=list)
    num_blocks_sent: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: Optional[Logprobs] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None
    weight_spans: list[WeightSpan] = field(default_factory=list)  # over the output tokens
    cache_salt: Optional[str] = None
    admitted_before: bool = False  # counted in the prompt-token totals

    @classmethod
    def from_message(cls, message: AddRequest) -> "Request":
        stops = set(message.sampling.stop_token_ids)
        if not message.sampling.ignore_eos:
            stops.update(message.eos_token_ids)
        return cls(
            request_id=message.request_id,
            user_request_id=message.user_request_id,
            client_index=message.client_index,
            sampling=message.sampling,
            stop_token_ids=frozenset(stops),
            all_token_ids=list(message.prompt_token_ids),
            num_prompt_tokens=len(message.prompt_token_ids),
            cache_salt=message.cache_salt,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int, logprobs: Optional[Logprobs], weight_version: str) -> None:
        self._extend_spans(weight_version)
        self.all_token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if self.known_to_workers:
            self.unsent_token_ids.append(token_id)
        if logprobs is not None:
            if self.new_logprobs is None:
                self.new_logprobs = Logprobs([], [], [])
            self.new_logprobs.extend(logprobs)

    def _extend_spans(self, weight_version: str) -> None:
        """The new output token (at index `num_output_tokens`) joins its version's span."""
        index, spans = self.num_output_tokens, self.weight_spans
        if spans and spans[-1].version == weight_version:
            spans[-1] = WeightSpan(weight_version, spans[-1].start, index + 1)
        else:
            spans.append(WeightSpan(weight_version, index, index + 1))

    def stop_reason(self, max_model_len: int) -> Optional[FinishReason]:
        """Why the request ends after its newest token, or None to go on."""
        if self.num_output_tokens > 0 and self.all_token_ids[-1] in self.stop_token_ids:
            return "stop"
        if self.num_output_tokens >= self.sampling.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def forget_workers(self) -> None:
        """After a preemption or for a recompute: the workers drop it, and it starts over from a
        prefix hit."""
        self.known_to_workers = False
        self.unsent_token_ids = []
        self.num_blocks_sent = 0
        self.num_computed_tokens = 0
        self.block_ids = []
        self.num_blocks_cached = 0
