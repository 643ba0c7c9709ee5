"""Continuous batching over a paged KV pool.

Each step: running requests first (in arrival order), each taking
`min(num_uncomputed_tokens, budget)` tokens; then waiting requests, starting from their
longest cached prefix, while the token budget, `max_num_seqs` and free blocks allow. A running
request that cannot get a block preempts the newest running one, whose blocks are freed and
which later starts over from its cached prefix (recompute).

Cached blocks are keyed by the weights that computed them (`weights_generation`), so a request
never reuses KV of older weights, and by the request's `cache_salt`; `weight_version` is the
label outputs carry.
"""

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from core.block_pool import BlockPool, hash_blocks
from core.request import Request, Status
from protocol.messages import INITIAL_WEIGHT_VERSION, CoreOutput, FinishReason
from protocol.step import NewRequest, ScheduledRequest, StepPlan, StepResult

logger = logging.getLogger(__name__)


@dataclass
class ScheduledStep:
    plan: StepPlan
    requests: list[tuple[Request, int]] = field(default_factory=list)


RoutedOutput = tuple[int, CoreOutput]
"""An output and the index of the frontend that owns its request."""


@dataclass
class TokenCounters:
    """Engine-wide totals since start, for metrics: prompt tokens of admitted requests (first
    admission), of them served from the prefix cache, and generated tokens."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


class Scheduler:
    def __init__(self, pool: BlockPool, limits: SchedulerLimits) -> None:
        self.pool = pool
        self.limits = limits
        self.weight_version = INITIAL_WEIGHT_VERSION
        self.weights_generation = 0
        self.requests: dict[str, Request] = {}
        self.by_user_id: dict[str, set[str]] = defaultdict(set)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.counters = TokenCounters()
        self._finished_ids: list[str] = []
        self._finished_outputs: list[RoutedOutput] = []
        self._next_step_id = 0

    def add(self, request: Request) -> None:
        request.block_hashes = self._hashes(request, 0, None)
        self._track(request)
        self.waiting.append(request)

    def schedule(self, admit_new: bool = True, run_running: bool = True) -> Optional[ScheduledStep]:
        """The next step, or None when nothing can run. A pause holds new requests
        (`admit_new=False`) and may freeze running ones (`run_running=False`)."""
        budget = self.limits.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preemptions_before = self.num_preemptions
        for request in list(self.running) if run_running else []:
            if budget == 0:
                break
            if request.status is not Status.RUNNING:
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self._grow(request, num_tokens):
                continue
            scheduled.append((request, num_tokens))
            budget -= num_tokens
        # After a preemption nothing new starts this step: the freed blocks go to those running.
        preempted = self.num_preemptions > preemptions_before
        computing = self._blocks_in_progress() if admit_new and self.waiting else set()
        deferred: list[Request] = []
        while admit_new and not preempted and budget > 0 and self.waiting and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting[0]
            if self._waits_for_shared_prefix(request, computing):
                deferred.append(self.waiting.popleft())
                continue
            num_tokens = self._admit(request, budget)
            if num_tokens == 0:
                break
            scheduled.append((self.waiting.popleft(), num_tokens))
            computing.update(_uncached_hashes(request))
            budget -= num_tokens
        self.waiting.extendleft(reversed(deferred))
        if not scheduled:
            return None
        return ScheduledStep(self._plan(scheduled), scheduled)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give a running request the blocks for `num_tokens` more, preempting the newest
        running requests as needed. False when `request` itself had to be preempted."""
        # Blocks may already be there: an interrupted step's are kept for its rerun.
        need = max(0, self.pool.blocks_for(request.num_computed_tokens + num_tokens) - len(request.block_ids))
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        request.block_ids += self.pool.allocate(need)
        return True

    def _blocks_in_progress(self) -> set[int]:
        """Hashes of the full blocks running requests know but have not computed (cached) yet."""
        computing: set[int] = set()
        for request in self.running:
            computing.update(_uncached_hashes(request))
        return computing

    def _waits_for_shared_prefix(self, request: Request, computing: set[int]) -> bool:
        """A request whose prefix a running one is computing now starts once those blocks are
        cached, and reuses them: `n` samples of one prompt compute it once."""
        reusable = request.block_hashes[: self._num_reusable_blocks(request)]
        return any(block_hash in computing for block_hash in reusable)

    def _num_reusable_blocks(self, request: Request) -> int:
        """How many of a waiting request's first blocks it may take from the cache. The last
        prompt token always runs: its logits give the first output token. Prompt logprobs need
        every prompt token's logits: nothing cached is reused."""
        if request.sampling.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            return 0
        return (request.num_tokens - 1) // self.pool.block_size

    def _admit(self, request: Request, budget: int) -> int:
        """Start a waiting request from its longest cached prefix; 0 when blocks are short."""
        hit = self.pool.lookup(request.block_hashes[: self._num_reusable_blocks(request)])
        self.pool.take(hit.blocks)
        num_tokens = min(request.num_tokens - hit.num_tokens, budget)
        need = self.pool.blocks_for(hit.num_tokens + num_tokens) - len(hit.blocks)
        if need > self.pool.num_free:
            self.pool.free(hit.blocks)
            return 0
        request.block_ids = hit.blocks + self.pool.allocate(need)
        request.num_computed_tokens = hit.num_tokens
        request.num_blocks_cached = len(hit.blocks)
        if request.num_output_tokens == 0:
            request.num_cached_tokens = hit.num_tokens
        if not request.admitted_before:
            request.admitted_before = True
            self.counters.prompt_tokens += request.num_prompt_tokens
            self.counters.cached_prompt_tokens += hit.num_tokens
        request.status = Status.RUNNING
        self.running.append(request)
        return num_tokens

    def _preempt(self, request: Request) -> None:
        logger.info("preempting %s: KV blocks ran out (it will be recomputed)", request.request_id)
        self._requeue(request)
        self.num_preemptions += 1

    def _requeue(self, request: Request) -> None:
        """Back to the head of the queue: its blocks are freed and its tokens prefilled again."""
        self.running.remove(request)
        self.pool.free(request.block_ids)
        if request.known_to_workers:
            self._finished_ids.append(request.request_id)
        request.forget_workers()
        request.block_hashes = self._hashes(request, 0, None)
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def new_weights(self, version: str) -> None:
        """New weights are loaded: later KV is cached apart from the old. Waiting requests hashed
        their blocks with the old weights, so they hash them again."""
        self.weights_generation += 1
        self.weight_version = version
        for request in self.waiting:
            request.block_hashes = self._hashes(request, 0, None)

    def recompute_running(self) -> int:
        """Every running request (frozen by a pause) goes back to the queue, in its order, to
        prefill its prompt and the tokens it generated again; returns how many."""
        requests = list(self.running)
        for request in reversed(requests):
            self._requeue(request)
        return len(requests)

    def reset_prefix_cache(self) -> int:
        """Forget the cached KV of every block no request holds; returns how many blocks."""
        return self.pool.forget_free_cached()

    def _plan(self, scheduled: list[tuple[Request, int]]) -> StepPlan:
        new_requests, deltas = [], []
        for request, num_tokens in scheduled:
            if not request.known_to_workers:
                new_requests.append(
                    NewRequest(
                        request.request_id,
                        list(request.all_token_ids),
                        list(request.block_ids),
                        request.num_computed_tokens,
                        request.sampling,
                        request.num_prompt_tokens,
                        sorted(request.stop_token_ids),
                    )
                )
                request.known_to_workers = True
                deltas.append(ScheduledRequest(request.request_id, num_tokens))
            else:
                new_blocks = request.block_ids[request.num_blocks_sent :]
                deltas.append(ScheduledRequest(request.request_id, num_tokens, request.unsent_token_ids, new_blocks))
            request.unsent_token_ids = []
            request.num_blocks_sent = len(request.block_ids)
        plan = StepPlan(self._next_step_id, new_requests, deltas, self._finished_ids)
        self._next_step_id += 1
        self._finished_ids = []
        return plan

    def update(self, step: ScheduledStep, result: StepResult) -> list[RoutedOutput]:
        """Apply a step's sampled tokens. Requests finished meanwhile (aborted during the step)
        are skipped: an abort received during a step wins over that step's output."""
        sampled = dict(zip(result.sampled_request_ids, result.sampled_token_ids))
        touched = []
        for request, num_tokens in step.requests:
            if request.status is not Status.RUNNING:
                continue
            request.num_computed_tokens += num_tokens
            self._cache_computed_blocks(request)
            found = result.prompt_logprobs.get(request.request_id)
            if found is not None:
                request.add_prompt_logprobs(found)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_token(token, result.logprobs.get(request.request_id), self.weight_version)
            self.counters.generation_tokens += 1
            request.block_hashes += self._hashes(request, len(request.block_hashes), request.block_hashes)
            reason = request.stop_reason(self.limits.max_model_len)
            if reason is not None:
                self._finish(request, reason)
            else:
                touched.append(request)
        return self.take_finished_outputs() + [self._output(r) for r in touched]

    def fail_step(self, step: ScheduledStep, error: str) -> list[RoutedOutput]:
        """A step the workers could not run: its requests end with an error."""
        for request, _ in step.requests:
            if request.status is Status.RUNNING:
                self._finish(request, "error", error)
        return self.take_finished_outputs()

    def abort(self, request_ids: Iterable[str]) -> list[str]:
        """Finish the given requests with "abort"; returns the ids that were live."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, "abort")
                aborted.append(request_id)
        return aborted

    def abort_user_ids(self, user_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Abort every live request carrying one of the users' ids, whichever frontend took it:
        `(aborted, not_found)` in user ids."""
        aborted, not_found = [], []
        for user_id in dict.fromkeys(user_ids):
            live = list(self.by_user_id.get(user_id, ()))
            (aborted if self.abort(live) else not_found).append(user_id)
        return aborted, not_found

    def abort_all(self) -> list[str]:
        return self.abort(list(self.requests))

    def abort_frontend(self, client_index: int) -> list[str]:
        """Abort every request a (dead) frontend owns."""
        return self.abort([r.request_id for r in self.requests.values() if r.client_index == client_index])

    def reject(self, request: Request, error: str, error_kind: Optional[str] = None) -> None:
        self._track(request)
        self._finish(request, "error", error, error_kind)

    def take_finished_outputs(self) -> list[RoutedOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        return outputs

    def _track(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.by_user_id[request.user_request_id].add(request.request_id)

    def _finish(
        self, request: Request, reason: FinishReason, error: Optional[str] = None, error_kind: Optional[str] = None
    ) -> None:
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        if request.known_to_workers:
            self._finished_ids.append(request.request_id)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.error, request.error_kind = error, error_kind
        del self.requests[request.request_id]
        same_user = self.by_user_id[request.user_request_id]
        same_user.discard(request.request_id)
        if not same_user:
            del self.by_user_id[request.user_request_id]
        self._finished_outputs.append(self._output(request))

    def _cache_computed_blocks(self, request: Request) -> None:
        num_full = request.num_computed_tokens // self.pool.block_size
        start = request.num_blocks_cached
        if num_full > start:
            self.pool.cache(request.block_ids[start:num_full], request.block_hashes[start:num_full])
            request.num_blocks_cached = num_full

    def _hashes(self, request: Request, start_block: int, known: Optional[list[int]]) -> list[int]:
        parent = known[-1] if known else None
        salt = (self.weights_generation, request.cache_salt)
        return hash_blocks(request.all_token_ids, self.pool.block_size, start_block, parent, salt)

    def _output(self, request: Request) -> RoutedOutput:
        output = CoreOutput(
            request.request_id,
            request.new_token_ids,
            request.new_logprobs,
            request.finish_reason,
            request.error,
            request.num_prompt_tokens,
            request.num_cached_tokens,
            self.weight_version,
            request.error_kind,
            list(request.weight_spans),
            request.take_prompt_logprobs(),
        )
        request.new_token_ids, request.new_logprobs = [], None
        return request.client_index, output


def _uncached_hashes(request: Request) -> list[int]:
    """The hashes of a request's full blocks not computed (cached) yet."""
    return request.block_hashes[request.num_blocks_cached :]
