"""ModelRunner in-process on tiny random models, against transformers' own `generate`."""

import pytest
import torch
import transformers

from protocol.messages import SamplingParams
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt, reference_generate

MAX_NEW = 6


def check_greedy(folder: str, reqs: list[Req]) -> None:
    done = ToyCore(make_runner(folder)).run(reqs)
    for r in reqs:
        assert done[r.id].output == reference_generate(folder, r.prompt, r.max_new), r.id


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_batch_of_prompts_matches_generate(kind, request):
    folder = request.getfixturevalue(f"{kind}_folder")
    check_greedy(folder, [Req(f"r{i}", prompt(i, n), MAX_NEW) for i, n in enumerate([3, 9, 17, 1])])


def test_chunked_prefill_across_steps(llama_folder):
    check_greedy(llama_folder, [Req("long", prompt(7, 23), MAX_NEW, chunk=5)])


def test_decodes_mixed_with_prefill_chunks(llama_folder):
    reqs = [
        Req("early", prompt(1, 6), 10),
        Req("late", prompt(2, 19), MAX_NEW, chunk=7, arrival=3),  # chunks run beside "early"'s decodes
        Req("later", prompt(3, 5), MAX_NEW, arrival=4),
    ]
    check_greedy(llama_folder, reqs)


def test_prefix_shared_through_block_ids(llama_folder):
    core = ToyCore(make_runner(llama_folder))
    prefix = prompt(11, 16)  # 4 full blocks of 4
    first = core.run([Req("first", prefix + prompt(12, 3), MAX_NEW)])["first"]
    shared = first.blocks[:4]
    second = Req("second", prefix + prompt(13, 5), MAX_NEW, shared_blocks=shared, num_cached=16)
    done = core.run([second])
    assert done["second"].blocks[:4] == shared
    assert done["second"].output == reference_generate(llama_folder, second.prompt, MAX_NEW)


def test_logprobs_equal_log_softmax_of_transformers_logits(llama_folder):
    req = Req("lp", prompt(5, 9), 4, sampling=SamplingParams(temperature=0.0, logprobs=3))
    done = ToyCore(make_runner(llama_folder)).run([req])["lp"]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([done.tokens])).logits[0]
    expected = logits.log_softmax(-1)[len(req.prompt) - 1 : -1]
    for i, (tok, lp) in enumerate(zip(done.output, done.logprobs)):
        assert lp.token_logprobs[0] == pytest.approx(expected[i, tok].item(), abs=1e-4)
        top = expected[i].topk(3)
        assert lp.top_token_ids[0] == top.indices.tolist()
        assert lp.top_logprobs[0] == pytest.approx(top.values.tolist(), abs=1e-4)
