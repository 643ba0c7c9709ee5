"""A trainer pushes new weights into a running engine over a weight group, while a rollout streams.

    python examples/trainer_sync.py [--address tcp://127.0.0.1:8100] [--packed] [--steps 2]

The trainer (this process) loads the engine's model with transformers, creates a gloo weight
group as rank 0, and the engine joins it. Each step it takes one SGD step on a sentence and
sends the new state dict with `sync_weights(..., atomic=True, kv="recompute")` while a greedy
rollout is streaming. It checks that the rollout completed whole with its tokens split between
the two weight versions, and that the engine now generates what transformers generates with
the trained weights. Without --address it starts an engine on the embedded model and stops it at
the end. It prints one line per check and exits with status 1 when one fails.
"""

import argparse
import asyncio
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*` and `examples.*`

from bench.common import resolve_model_folder, setup_logging  # noqa: E402
from examples.support import Checks, engine_addresses  # noqa: E402
from frontend.client import AsyncClient, RequestOutput  # noqa: E402
from frontend.weight_sync import TrainerWeightGroup, sync_weights  # noqa: E402
from protocol.weights import WeightUpdateResult  # noqa: E402
from launch.local import free_port_range  # noqa: E402

SENTENCE = "The capital of France is Paris. The capital of Italy is Rome."
PROMPT = "The capital of Spain is"
NUM_TOKENS = 48


def train_step(model: transformers.PreTrainedModel, tokenizer, learning_rate: float) -> float:
    """One SGD step of next-token loss on SENTENCE; returns the loss."""
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    value = float(loss.detach())
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= learning_rate * param.grad
                param.grad = None
    model.eval()
    return value


@torch.inference_mode()
def greedy(model: transformers.PreTrainedModel, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy tokens, EOS neither masked nor stopping (as the engine's ignore_eos)."""
    model.generation_config.eos_token_id = None
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=num_tokens, min_new_tokens=0,
                                           eos_token_id=None, pad_token_id=0)  # fmt: skip
    return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


async def rollout(
    client: AsyncClient, prompt: list[int], request_id: str, started: asyncio.Event | None = None
) -> tuple[list[int], RequestOutput]:
    """A greedy rollout's tokens and final output; `started` is set after its first 8 tokens."""
    tokens, final = [], None
    async for out in client.generate(token_ids=prompt, request_id=request_id, max_tokens=NUM_TOKENS,
                                     temperature=0.0, ignore_eos=True):  # fmt: skip
        tokens += out.token_ids
        final = out
        if started is not None and len(tokens) >= 8:
            started.set()
    return tokens, final


async def push_during_rollout(
    client: AsyncClient, group: TrainerWeightGroup, model: transformers.PreTrainedModel, prompt: list[int],
    step: int, packed: bool,
) -> tuple[WeightUpdateResult, list[int], RequestOutput]:
    """Start a rollout, and once it streamed a few tokens, send the weights atomically, recomputing
    its KV."""
    first_tokens = asyncio.Event()
    streaming = asyncio.ensure_future(rollout(client, prompt, f"rollout-{step}", first_tokens))
    await first_tokens.wait()
    result = await sync_weights(client, group, model.state_dict(), packed=packed, atomic=True, kv="recompute",
                                version=f"step-{step}")  # fmt: skip
    tokens, final = await streaming
    return result, tokens, final


async def run(address: str, folder: str, args: argparse.Namespace, checks: Checks) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(PROMPT).input_ids
    async with AsyncClient(address) as client:
        world_size = 1 + (await client.get_state()).num_workers
        port = free_port_range(1)
        joined = asyncio.ensure_future(client.init_weight_group("127.0.0.1", port, 1, world_size, "trainer"))
        group = await asyncio.to_thread(TrainerWeightGroup.create, "127.0.0.1", port, world_size, "trainer")
        await joined
        checks.check(True, f"the engine joined weight group 'trainer' (world size {world_size})")
        try:
            for step in range(1, args.steps + 1):
                loss = train_step(model, tokenizer, args.learning_rate)
                result, tokens, final = await push_during_rollout(client, group, model, prompt, step, args.packed)
                spans = [(s.version, s.start, s.end) for s in final.weight_versions]
                checks.check(result.weight_version == f"step-{step}",
                             f"step {step} (loss {loss:.3f}): {result.num_tensors} tensors in {result.seconds:.2f} s")
                whole = len(tokens) == NUM_TOKENS and final.finish_reason == "length" and spans[-1][2] == NUM_TOKENS
                checks.check(whole, f"the rollout across the update completed whole: {len(tokens)} tokens, "
                                    f"versions {spans}")  # fmt: skip
                fresh, _ = await rollout(client, prompt, f"fresh-{step}")
                same = sum(a == b for a, b in zip(fresh, greedy(model, prompt, NUM_TOKENS)))
                checks.check(same == NUM_TOKENS, f"a new rollout is transformers' greedy with the trained weights "
                                                 f"({same}/{NUM_TOKENS} tokens)")  # fmt: skip
        finally:
            await client.destroy_weight_group("trainer")
            group.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="a running engine's frontend (default: start one)")
    parser.add_argument("--model", default=None, help="the engine's model folder (default: embedded SmolLM2)")
    parser.add_argument("--packed", action="store_true", help="send packed buckets, not one broadcast per tensor")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    setup_logging()
    checks = Checks()
    folder = resolve_model_folder(args.model)
    with engine_addresses([args.address] if args.address else [], 1, folder) as addresses:
        asyncio.run(run(addresses[0], folder, args, checks))
    sys.exit(checks.exit_code())


if __name__ == "__main__":
    main()
