"""The core's view of one request: its tokens, how far their KV is computed, its blocks."""

import enum
import logging
from dataclasses import dataclass, field
from typing import Optional

from protocol.messages import AddRequest, FinishReason, Logprobs, SamplingParams, WeightSpan
from protocol.step import PromptLogprobs

logger = logging.getLogger(__name__)


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
    prompt_logprobs: Optional[Logprobs] = None  # of prompt tokens 1.., when asked; sent once
    prompt_logprobs_sent: bool = False

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
            prompt_logprobs=None if message.sampling.prompt_logprobs is None else Logprobs([], [], []),
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

    def add_prompt_logprobs(self, found: PromptLogprobs) -> None:
        """Keep the logprobs of prompt tokens not had yet: a prompt computed again (after a
        preemption) sends the ones before again."""
        have = self.prompt_logprobs
        if have is None or self.prompt_logprobs_sent:
            return
        expected = 1 + len(have.token_logprobs)
        skip = expected - found.start
        if skip < 0:  # never sent so: a worker bug, which must not stop the core
            logger.error("%s: prompt logprobs from token %d came before token %d", self.request_id, found.start,
                         expected)  # fmt: skip
            return
        have.token_logprobs += found.logprobs.token_logprobs[skip:]
        have.top_token_ids += found.logprobs.top_token_ids[skip:]
        have.top_logprobs += found.logprobs.top_logprobs[skip:]

    def take_prompt_logprobs(self) -> Optional[Logprobs]:
        """The prompt logprobs, once: with the first output, when the prompt is all computed."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent or self.num_output_tokens == 0:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

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
