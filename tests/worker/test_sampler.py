"""Sampling: seeds are per request, whatever else shares the batch; filters behave."""

import torch

from protocol.messages import SamplingParams
from worker.sampler import SampleRow, _filtered_probs, sample
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
