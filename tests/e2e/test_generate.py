"""End to end through every process: greedy tokens equal transformers' own `generate`."""

import asyncio

import pytest

from frontend.client import AsyncClient
from tests.e2e.engine import start_engine
from tests.reference import assert_matches_greedy, greedy_logprobs, greedy_tokens, load_reference

pytestmark = pytest.mark.timeout(600)

SHARED_PREFIX = (
    "You are a careful assistant. Read the following notes about the history of the harbour town, "
    "its fishing fleet, the lighthouse keepers and the storms of the last century, then answer. "
)
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    SHARED_PREFIX + "Who kept the lighthouse?",
    SHARED_PREFIX + "When was the worst storm?",
    SHARED_PREFIX + "How many boats were in the fleet?",
    "def fibonacci(n):\n    ",
    "List three colours: red,",
    "A" * 3 + " quick brown fox jumps over the lazy dog. " * 6,
    SHARED_PREFIX * 4 + "Summarise the notes.",  # longer than a 64-token budget: several chunks
]
NUM_TOKENS = 64
BLOCK_BYTES = 2 * 2 * 8 * 2 * 16 * 4  # K and V, 2 layers, 8 tokens, 2 KV heads, head_dim 16, fp32


async def collect(client: AsyncClient, **request) -> tuple[list[int], list]:
    tokens, outputs = [], []
    async for output in client.generate(**request):
        tokens += output.token_ids
        outputs.append(output)
    return tokens, outputs


async def generate_all(address: str, prompts: list[list[int]], **sampling) -> list[list[int]]:
    async with AsyncClient(address) as client:
        results = await asyncio.gather(
            *(collect(client, token_ids=p, max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, **sampling)
              for p in prompts)
        )
    return [tokens for tokens, _ in results]


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_folder):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_folder, smollm2_prompts):
    model = load_reference(smollm2_folder)
    return model, [greedy_tokens(model, p, NUM_TOKENS) for p in smollm2_prompts]


def test_smollm2_concurrent_greedy_equals_transformers(smollm2_folder, smollm2_prompts, smollm2_reference):
    model, reference = smollm2_reference
    engine = start_engine(smollm2_folder)
    try:
        ours = asyncio.run(generate_all(engine.addresses[0], smollm2_prompts))
        second = asyncio.run(generate_all(engine.addresses[0], smollm2_prompts[2:4]))  # prefix cache warm
    finally:
        engine.stop()
    for prompt, mine, theirs in zip(smollm2_prompts, ours, reference):
        assert_matches_greedy(model, prompt, mine, theirs)
    assert second == ours[2:4]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_greedy_with_chunked_prefill_and_preemption(arch, tiny_models, smollm2_prompts):
    """A 64-token budget splits the long prompts into chunks; a 40-block pool forces preemption."""
    folder = tiny_models[arch]
    model = load_reference(folder)
    engine = start_engine(folder, "--max-num-batched-tokens", "64", "--block-size", "8",
                          "--kv-cache-memory", str(40 * BLOCK_BYTES))
    try:
        ours = asyncio.run(generate_all(engine.addresses[0], smollm2_prompts))
        state = asyncio.run(_state(engine.addresses[0]))
    finally:
        engine.stop()
    assert state.num_preemptions > 0
    for prompt, mine in zip(smollm2_prompts, ours):
        assert_matches_greedy(model, prompt, mine, greedy_tokens(model, prompt, NUM_TOKENS))


def test_tensor_parallel_two_workers_equals_one(tiny_models, smollm2_prompts):
    folder = tiny_models["llama"]
    model = load_reference(folder)
    engine = start_engine(folder, "--workers", "2")
    try:
        ours = asyncio.run(generate_all(engine.addresses[0], smollm2_prompts[:4]))
    finally:
        engine.stop()
    for prompt, mine in zip(smollm2_prompts, ours):
        assert_matches_greedy(model, prompt, mine, greedy_tokens(model, prompt, NUM_TOKENS))


def test_greedy_logprobs_equal_transformers_log_softmax(tiny_models, smollm2_prompts):
    folder = tiny_models["qwen2"]
    model = load_reference(folder)
    engine = start_engine(folder)
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client:
                return await collect(client, token_ids=smollm2_prompts[1], max_tokens=8, temperature=0.0,
                                     ignore_eos=True, logprobs=3)
        tokens, outputs = asyncio.run(run())
    finally:
        engine.stop()
    ours = [lp for o in outputs if o.logprobs for lp in o.logprobs.token_logprobs]
    expected = greedy_logprobs(model, smollm2_prompts[1], tokens)
    assert len(ours) == len(tokens) == 8
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-4
    top = [ids for o in outputs if o.logprobs for ids in o.logprobs.top_token_ids]
    assert all(len(ids) == 3 and ids[0] == t for ids, t in zip(top, tokens))


async def _state(address: str):
    async with AsyncClient(address) as client:
        return await client.get_state()
