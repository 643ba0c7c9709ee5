"""Generation as every HTTP dialect needs it: several prompts times `n` samples run as concurrent
requests through the frontend's client, their outputs merged in the order they come, or collected.

Every sample of one HTTP request carries the same user id, so an abort by that id (from any API
server) ends all of them. Sample `i` of a seeded request uses seed `seed + i`, so the samples differ
and each is reproducible.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from frontend.client import AsyncClient, RequestOutput
from protocol.messages import Logprobs, WeightSpan


@dataclass
class Sample:
    """One choice: a prompt's `n`-th sample, accumulated from its outputs."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    finish_reason: str | None = None
    weight_version: str = ""
    weight_versions: list[WeightSpan] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_logprobs: Logprobs | None = None  # of prompt tokens 1.., when asked

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.token_ids += out.token_ids
        self.text += out.text
        if out.logprobs is not None:
            self.token_logprobs += out.logprobs.token_logprobs
            self.top_ids += out.logprobs.top_token_ids
            self.top_logprobs += out.logprobs.top_logprobs
        self.finish_reason = out.finish_reason
        self.weight_version, self.weight_versions = out.weight_version, out.weight_versions
        self.cached_tokens = out.cached_tokens


@dataclass(frozen=True)
class GenerationRequest:
    """What one HTTP request asks: `prompts` (token ids) times `n` samples of `sampling`."""

    request_id: str
    prompts: list[list[int]]
    sampling: dict[str, Any]
    n: int = 1
    cache_salt: str | None = None
    hold_while_paused: bool = False  # held even under --paused-requests reject (the SGLang dialect)


def samples_of(request: GenerationRequest) -> list[Sample]:
    return [Sample(p * request.n + i, prompt) for p, prompt in enumerate(request.prompts) for i in range(request.n)]


async def stream_outputs(client: AsyncClient, request: GenerationRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`(sample index, output)` of every sample as it comes. A sample that fails raises here (and
    the others are cancelled); leaving the iteration early cancels them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
    samples = samples_of(request)
    tasks = [asyncio.ensure_future(_run(client, request, sample, queue)) for sample in samples]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(client: AsyncClient, request: GenerationRequest) -> list[Sample]:
    samples = samples_of(request)
    async for index, out in stream_outputs(client, request):
        samples[index].add(out)
    return samples


async def _run(client: AsyncClient, request: GenerationRequest, sample: Sample, queue: asyncio.Queue) -> None:
    sampling = dict(request.sampling)
    if sampling.get("seed") is not None:
        sampling["seed"] += sample.index % request.n
    try:
        async with contextlib.aclosing(
            client.generate(token_ids=sample.prompt_ids, request_id=request.request_id, cache_salt=request.cache_salt,
                            hold_while_paused=request.hold_while_paused, **sampling)  # fmt: skip
        ) as outputs:
            async for out in outputs:
                queue.put_nowait((sample.index, out))
    except asyncio.CancelledError:
        raise
    except Exception as error:  # the HTTP request fails with it
        queue.put_nowait((sample.index, error))


def spans_json(spans: list[WeightSpan]) -> list[dict[str, Any]]:
    """`weight_versions` as every dialect shows them: `[{version, start, end}]`."""
    return [{"version": s.version, "start": s.start, "end": s.end} for s in spans]
