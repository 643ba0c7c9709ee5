"""Sampling: seeds are per request, whatever else shares the batch; filters behave."""

from pathlib import Path

import torch

from protocol.messages import SamplingParams
from worker.sampler import SampleRow, _filtered_probs, adjusted_logits, sample
from tests.reference import greedy_tokens, load_reference
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt

SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)


def seeded_tokens(folder: str, others: list[Req]) -> list[int]:
    target = Req("target", prompt(21, 7), 8, sampling=SEEDED)
    return ToyCore(make_runner(folder)).run([target, *others])["target"].output


def test_same_seed_same_tokens_whatever_the_batch(llama_folder):
    alone = seeded_tokens(llama_folder, [])
    crowded = seeded_tokens(llama_folder, [
        Req("greedy", prompt(22, 5), 4),
        Req("unseeded", prompt(23, 11), 8, sampling=SamplingParams(temperature=0.8)),
        Req("other-seed", prompt(24, 3), 8, sampling=SamplingParams(temperature=1.5, seed=1)),
    ])
    assert crowded == alone
    assert len(set(alone)) > 1  # it really sampled


def test_top_k_1_equals_greedy(llama_folder):
    greedy = Req("g", prompt(31, 9), 8)
    top1 = Req("k", prompt(31, 9), 8, sampling=SamplingParams(temperature=1.3, top_k=1))
    done = ToyCore(make_runner(llama_folder)).run([greedy, top1])
    assert done["k"].output == done["g"].output


def test_filters_zero_what_they_drop():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.25)]
    probs = _filtered_probs(logits, params)
    assert (probs > 0).tolist() == [[True, True, False, False]] * 2 + [[True, True, True, False]]


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9]])
    rows = [SampleRow(SamplingParams(temperature=0.0), None),
            SampleRow(SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))]
    assert sample(logits, rows)[0].item() == 1


def test_penalties_as_vllm_applies_them():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    row = SampleRow(params, None, token_ids=[0, 1, 3, 3], num_prompt_tokens=2)  # prompt 0, 1; output 3, 3
    adjusted = adjusted_logits(logits, [row])[0].tolist()
    # repetition over prompt and output (0, 1, 3); frequency and presence over the output (3 twice)
    assert adjusted == [1.0, -2.0, 0.5, 3.0 / 2 - 0.5 * 2 - 0.25, 1.0]
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 3.0, 1.0]  # the caller's logits (for logprobs) stay raw


def test_stop_tokens_are_masked_before_min_tokens():
    logits = torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]])
    early = SampleRow(SamplingParams(temperature=0.0, min_tokens=3), None, [5, 6, 1], 2, stop_token_ids=[2])
    done = SampleRow(SamplingParams(temperature=0.0, min_tokens=1), None, [5, 6, 1], 2, stop_token_ids=[2])
    assert sample(logits, [early, done]).tolist() == [0, 2]


def test_repetition_penalty_greedy_matches_transformers(llama_folder):
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    req = Req("rep", prompt(41, 9), 12, sampling=params)
    ours = ToyCore(make_runner(llama_folder)).run([req])["rep"].output
    reference = load_reference(Path(llama_folder))
    assert ours == greedy_tokens(reference, req.prompt, 12, repetition_penalty=1.5)
    assert ours != greedy_tokens(reference, req.prompt, 12)  # the penalty changed something
