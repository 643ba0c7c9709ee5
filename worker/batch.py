"""Persistent per-request rows on the worker, updated from each `StepPlan`, and the step's tensors.

Token rule: the worker never appends the tokens it samples. The core sends every new token back
in the next step's `ScheduledRequest.new_token_ids`, and only those are appended. So every rank
(sampling or not) holds the same tokens, and a request samples exactly when

    | computed (KV in cache) | scheduled this step |  reaches  len(token_ids).
"""

from dataclasses import dataclass, field
from itertools import chain

import torch

from protocol.messages import SamplingParams
from protocol.step import NewRequest, ScheduledRequest, StepPlan


@dataclass
class RequestState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None  # set once from `sampling.seed`; None draws from the global RNG
    num_prompt_tokens: int = 0  # token_ids after these are outputs (penalties, min_tokens count them)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class PromptRows:
    """Rows of a request's prompt logprobs this step: packed-batch positions `[first, first +
    count)` predict prompt tokens `[start, start + count)`."""

    request_id: str
    first: int
    start: int
    count: int
    num_top: int
    targets: list[int]


@dataclass
class StepInputs:
    """The packed batch `[T]` of one step and, for the requests that sample, their rows."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_starts: list[int]  # per scheduled request, offset in the packed batch
    query_lens: list[int]
    context_lens: torch.Tensor  # [N] computed + scheduled
    block_tables: torch.Tensor  # [N, max_blocks], padded with block 0
    sample_indices: torch.Tensor  # [S] last token of each sampling request
    sample_ids: list[str]
    sample_states: list[RequestState]
    prompt_rows: list[PromptRows]

    @property
    def logit_indices(self) -> torch.Tensor:
        """The positions whose logits the step needs: the sampling ones, then the prompt rows'."""
        if not self.prompt_rows:
            return self.sample_indices
        rows = [torch.arange(r.first, r.first + r.count, device=self.sample_indices.device) for r in self.prompt_rows]
        return torch.cat([self.sample_indices, *rows])


class BatchState:
    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.requests: dict[str, RequestState] = {}

    def apply(self, plan: StepPlan) -> None:
        """Drop finished requests, register new ones, then apply this step's deltas."""
        for request_id in plan.finished_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = self._register(new)
        for sched in plan.scheduled:
            state = self._get(sched.request_id)
            state.token_ids.extend(sched.new_token_ids)
            state.block_ids.extend(sched.new_block_ids)

    def _register(self, new: NewRequest) -> RequestState:
        generator = None
        if new.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(new.sampling.seed)
        return RequestState(
            token_ids=list(new.token_ids),
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=new.sampling,
            generator=generator,
            num_prompt_tokens=new.num_prompt_tokens,
            stop_token_ids=list(new.stop_token_ids),
        )

    def _get(self, request_id: str) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            raise KeyError(f"request {request_id!r} scheduled but never registered")
        return state

    def build(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        states = [self._get(s.request_id) for s in scheduled]
        query_lens = [s.num_scheduled_tokens for s in scheduled]
        computed = [st.num_computed_tokens for st in states]
        context = [c + q for c, q in zip(computed, query_lens)]
        for sched, state, ctx in zip(scheduled, states, context):
            self._check_fits(sched.request_id, state, ctx)
        input_ids = list(chain.from_iterable(st.token_ids[c:n] for st, c, n in zip(states, computed, context)))
        query_starts = _exclusive_cumsum(query_lens)
        samples = [i for i, (st, n) in enumerate(zip(states, context)) if n == len(st.token_ids)]

        q_lens = self._tensor(query_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(len(states), device=self.device), q_lens)
        # Position of each token: its index in the packed batch, minus its chunk's start, plus
        # what its request had computed before.
        shift = self._tensor(computed) - self._tensor(query_starts)
        positions = torch.arange(len(input_ids), device=self.device) + shift[seq_of_token]
        block_tables = self._tensor(_padded([st.block_ids for st in states]))
        blocks = block_tables[seq_of_token, positions // self.block_size]
        return StepInputs(
            input_ids=self._tensor(input_ids),
            positions=positions,
            slot_mapping=blocks * self.block_size + positions % self.block_size,
            query_starts=query_starts,
            query_lens=query_lens,
            context_lens=self._tensor(context),
            block_tables=block_tables,
            sample_indices=self._tensor([query_starts[i] + query_lens[i] - 1 for i in samples]),
            sample_ids=[scheduled[i].request_id for i in samples],
            sample_states=[states[i] for i in samples],
            prompt_rows=_prompt_rows(scheduled, states, computed, context, query_starts),
        )

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _check_fits(self, request_id: str, state: RequestState, context_len: int) -> None:
        if context_len > len(state.token_ids):
            raise ValueError(f"request {request_id!r}: {context_len} tokens scheduled, {len(state.token_ids)} known")
        if context_len > len(state.block_ids) * self.block_size:
            raise ValueError(f"request {request_id!r}: {context_len} tokens need more than its {len(state.block_ids)} blocks")

    def advance(self, scheduled: list[ScheduledRequest]) -> None:
        """After a step: the scheduled tokens are now in the cache."""
        for sched in scheduled:
            self.requests[sched.request_id].num_computed_tokens += sched.num_scheduled_tokens


def _prompt_rows(
    scheduled: list[ScheduledRequest], states: list[RequestState], computed: list[int], context: list[int],
    query_starts: list[int],
) -> list[PromptRows]:
    """For requests that asked for prompt logprobs: each scheduled position whose next token is a
    prompt token (the last prompt token's logits sample the first output)."""
    rows = []
    for sched, state, begin, end, query_start in zip(scheduled, states, computed, context, query_starts):
        num_top = state.sampling.prompt_logprobs
        last = min(end, state.num_prompt_tokens - 1)
        if num_top is None or begin >= last:
            continue
        targets = state.token_ids[begin + 1 : last + 1]
        rows.append(PromptRows(sched.request_id, query_start, begin + 1, last - begin, num_top, targets))
    return rows


def _exclusive_cumsum(values: list[int]) -> list[int]:
    starts, total = [], 0
    for value in values:
        starts.append(total)
        total += value
    return starts


def _padded(rows: list[list[int]]) -> list[list[int]]:
    width = max((len(row) for row in rows), default=0)
    return [row + [0] * (width - len(row)) for row in rows]
