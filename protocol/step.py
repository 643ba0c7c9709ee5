"""The core's step plan for the workers and rank 0's result.

A request is sent to the workers in full once (`NewRequest`), then only as deltas
(`ScheduledRequest`). Every rank receives every plan; rank 0 answers.

    tokens of a request: | computed (KV in cache) | scheduled this step | not yet |
"""

from typing import Optional

import msgspec

from protocol.messages import Logprobs, SamplingParams
from protocol.weights import WorkerCommand, WorkerReply


class NewRequest(msgspec.Struct, array_like=True):
    """A request the workers have not seen (or saw before a preemption). `token_ids` holds the
    prompt plus any tokens generated before a preemption; `block_ids` its blocks so far.
    `stop_token_ids` (EOS included unless ignored) are masked before `sampling.min_tokens`."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingParams
    num_prompt_tokens: int = 0
    stop_token_ids: list[int] = []


class ScheduledRequest(msgspec.Struct, array_like=True):
    """One request's share of a step. `new_token_ids` are tokens appended since the worker last
    saw it (the token sampled last step); `new_block_ids` extend its block table."""

    request_id: str
    num_scheduled_tokens: int
    new_token_ids: list[int] = []
    new_block_ids: list[int] = []


class StepPlan(msgspec.Struct, tag="step", array_like=True):
    """Applied in this order: `finished_ids` are dropped (finished, aborted, preempted); then
    `new_requests` are registered; then each of `scheduled` runs `num_scheduled_tokens` tokens
    from its `num_computed_tokens`. A request samples a token when the step reaches the end of
    its known tokens. A request never appears in both `finished_ids` and `new_requests`."""

    step_id: int
    new_requests: list[NewRequest] = []
    scheduled: list[ScheduledRequest] = []
    finished_ids: list[str] = []
    profile: bool = False  # time the step's parts (`StepResult.seconds`)


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Logprobs of prompt tokens `start, start + 1, ...`, each given the tokens before it."""

    start: int
    logprobs: Logprobs


class StepResult(msgspec.Struct, tag="step_result", array_like=True):
    """Sampled tokens in plan order, one per request that sampled; logprobs for those that asked,
    and prompt logprobs of the prompt tokens this step computed for those that asked."""

    step_id: int
    sampled_request_ids: list[str] = []
    sampled_token_ids: list[int] = []
    logprobs: dict[str, Logprobs] = {}
    prompt_logprobs: dict[str, PromptLogprobs] = {}
    error: Optional[str] = None
    interrupted: bool = False  # abandoned on an `InterruptStep`: nothing computed, nothing sampled
    seconds: dict[str, float] = {}  # the parts' times, when the plan asked (`worker.profile`)


class WorkerReady(msgspec.Struct, tag="worker_ready", array_like=True):
    """A rank's first message: the KV pool it allocated and the model's limits."""

    rank: int
    num_kv_blocks: int
    max_model_len: int
    error: Optional[str] = None


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class InterruptStep(msgspec.Struct, tag="interrupt", array_like=True):
    """Abandon step `step_id` at its next layer boundary if it still runs (a pause that freezes or
    aborts everything need not wait for it). Sent on a socket of its own, which a worker reads
    while its main thread is in a forward; a forward that cannot stop ignores it."""

    step_id: int


CoreToWorker = StepPlan | Shutdown | WorkerCommand
WorkerToCore = StepResult | WorkerReady | WorkerReply
