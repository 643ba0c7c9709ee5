"""Tiny models and a toy core for driving `ModelRunner` in-process with hand-made `StepPlan`s."""

from dataclasses import dataclass, field

from pathlib import Path

import torch

from protocol.messages import Logprobs, SamplingParams
from protocol.step import NewRequest, ScheduledRequest, StepPlan
from worker.kv_cache import allocate_kv_cache, kv_shape
from worker.model_loader import load_model
from worker.model_runner import ModelRunner

from tests.reference import greedy_tokens, load_reference
from tests.tiny_models import save_tiny_model, tiny_config

BLOCK_SIZE = 4
CONFIGS = {
    "llama": lambda: tiny_config("llama"),
    "qwen2": lambda: tiny_config("qwen2"),
    "qwen3": lambda: tiny_config("qwen3"),
    # 9 heads / 3 KV heads: not divisible by 2 workers
    "odd": lambda: tiny_config("llama", heads=9, kv_heads=3, head_dim=8),
}


def tiny_model(kind: str, folder: str) -> str:
    return str(save_tiny_model(CONFIGS[kind](), Path(folder)))


def make_runner(
    folder: str,
    num_blocks: int = 256,
    tp_size: int = 1,
    is_driver: bool = True,
    native: bool | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ModelRunner:
    """On `device` in `dtype`. `native` defaults to what the worker does: the native forward on one rank only."""
    device = torch.device(device)
    model = load_model(folder, device, dtype, tp_size)
    shape = kv_shape(model.config, tp_size)
    kv_cache = allocate_kv_cache(num_blocks, BLOCK_SIZE, shape, dtype, device)
    return ModelRunner(model, kv_cache, device, is_driver=is_driver, native=tp_size == 1 if native is None else native)


def reference_generate(folder: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    return greedy_tokens(load_reference(Path(folder)), prompt, max_new_tokens)


@dataclass
class Req:
    """One request as the toy core sees it. `chunk` caps tokens per step; `arrival` is its first step.
    `shared_blocks` / `num_cached` start it on blocks that already hold its prefix's KV."""

    id: str
    prompt: list[int]
    max_new: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    chunk: int = 10**9
    arrival: int = 0
    shared_blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    stop_ids: list[int] = field(default_factory=list)
    # state
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    unsent: list[int] = field(default_factory=list)
    registered: bool = False
    output: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, Logprobs]] = field(default_factory=list)  # (first token, its logprobs)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


class ToyCore:
    """Schedules every arrived request each step (a chunk or one decode) and feeds tokens back."""

    def __init__(self, runner, block_size: int = BLOCK_SIZE) -> None:
        self.runner = runner
        self.block_size = block_size
        self.next_block = 0
        self.step_id = 0
        self.finished: list[str] = []

    def alloc(self, n: int) -> list[int]:
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids

    def run(self, reqs: list[Req]) -> dict[str, Req]:
        while not all(r.done for r in reqs):
            self.step([r for r in reqs if r.arrival <= self.step_id and not r.done])
        self.finished = []
        return {r.id: r for r in reqs}

    def step(self, active: list[Req]) -> None:
        plan = StepPlan(step_id=self.step_id, finished_ids=self.finished)
        self.finished = []
        for r in active:
            plan.scheduled.append(self._schedule(r, plan))
        result = self.runner.execute(plan)
        assert result.error is None, result.error
        self.step_id += 1
        if result.interrupted:  # nothing was computed: the same tokens are scheduled again
            return
        by_id = {r.id: r for r in active}
        for sched in plan.scheduled:
            by_id[sched.request_id].computed += sched.num_scheduled_tokens
        for rid, found in result.prompt_logprobs.items():
            by_id[rid].prompt_logprobs.append((found.start, found.logprobs))
        for rid, tok in zip(result.sampled_request_ids, result.sampled_token_ids):
            r = by_id[rid]
            r.tokens.append(tok)
            r.unsent = [tok]
            r.output.append(tok)
            if rid in result.logprobs:
                r.logprobs.append(result.logprobs[rid])
            if r.done:
                self.finished.append(rid)

    def _schedule(self, r: Req, plan: StepPlan) -> ScheduledRequest:
        if not r.registered:
            r.tokens, r.blocks, r.computed = list(r.prompt), list(r.shared_blocks), r.num_cached
        n = min(len(r.tokens) - r.computed, r.chunk)
        need = -(-(r.computed + n) // self.block_size) - len(r.blocks)
        new_blocks = self.alloc(max(need, 0))
        r.blocks += new_blocks
        if not r.registered:
            r.registered = True
            plan.new_requests.append(
                NewRequest(r.id, list(r.tokens), list(r.blocks), r.computed, r.sampling, len(r.prompt), r.stop_ids)
            )
            return ScheduledRequest(r.id, n)
        sched = ScheduledRequest(r.id, n, new_token_ids=r.unsent, new_block_ids=new_blocks)
        r.unsent = []
        return sched


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (length,), generator=g).tolist()
