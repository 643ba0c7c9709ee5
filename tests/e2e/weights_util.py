"""Shared by the weight tests: a served model and others of its shape with transformers'
references, greedy outputs through a client, and a trainer group in the test process."""

import asyncio
import contextlib
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from frontend.client import AsyncClient
from frontend.weight_sync import TrainerWeightGroup
from launch.local import free_port_range
from tests.reference import assert_matches_greedy, greedy_tokens, load_reference
from tests.tiny_models import perturbed_copy

PROMPTS = [[5, 6, 7, 8, 9], list(range(300, 340)), [17, 4000, 220, 9, 31, 77, 1200]]
NUM_TOKENS = 8


class Models:
    """The served model `a` and two others of its shape, with transformers' references."""

    def __init__(self, root: Path, a: Path, scale: float = 0.5) -> None:
        self.folders = {
            "a": a,
            "b": perturbed_copy(a, root / "b", seed=1, scale=scale),
            "c": perturbed_copy(a, root / "c", seed=2, scale=scale),
        }
        self._references: dict = {}

    def reference(self, name: str):
        if name not in self._references:
            self._references[name] = load_reference(self.folders[name])
        return self._references[name]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.folders[name] / "model.safetensors")

    def greedy(self, name: str, prompt: list[int], num_tokens: int = NUM_TOKENS) -> list[int]:
        return greedy_tokens(self.reference(name), prompt, num_tokens)

    def assert_serves(self, name: str, outputs: list[list[int]]) -> None:
        for prompt, ours in zip(PROMPTS, outputs):
            assert_matches_greedy(self.reference(name), prompt, ours, self.greedy(name, prompt))


@contextlib.asynccontextmanager
async def two_clients(engine):
    async with AsyncClient(engine.addresses[0]) as generating, AsyncClient(engine.addresses[1]) as control:
        yield generating, control


async def greedy_outputs(client: AsyncClient, prompts=PROMPTS, num_tokens: int = NUM_TOKENS) -> list:
    """The final output of each prompt, its `token_ids` replaced by all its tokens."""
    async def one(prompt):
        stream = client.generate(token_ids=prompt, max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
        outputs = [o async for o in stream]
        outputs[-1].token_ids = [t for o in outputs for t in o.token_ids]
        return outputs[-1]
    return await asyncio.gather(*(one(p) for p in prompts))


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def weight_group(client: AsyncClient, name: str, num_workers: int = 1):
    """A trainer group in this process, which the engine joins."""
    port = free_port_range(1)
    joined = asyncio.ensure_future(client.init_weight_group("127.0.0.1", port, 1, num_workers + 1, name, timeout_s=60))
    group = await asyncio.to_thread(TrainerWeightGroup.create, "127.0.0.1", port, num_workers + 1, name, "gloo", 60)
    await joined
    try:
        yield group
    finally:
        await client.destroy_weight_group(name)
        group.destroy()
