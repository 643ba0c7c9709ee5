"""ModelRunner in-process on tiny random models, against transformers' own `generate`."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from protocol.messages import SamplingParams
from worker import projections
from tests.tiny_models import save_tiny_model, tiny_config
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt, reference_generate

MAX_NEW = 6


def check_greedy(folder: str, reqs: list[Req], native: bool = True, device: str = "cpu", runner=None) -> None:
    done = ToyCore(runner or make_runner(folder, native=native, device=device)).run(reqs)
    for r in reqs:
        assert done[r.id].output == reference_generate(folder, r.prompt, r.max_new), r.id


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_batch_of_prompts_matches_generate(kind, native, request):
    folder = request.getfixturevalue(f"{kind}_folder")
    check_greedy(folder, [Req(f"r{i}", prompt(i, n), MAX_NEW) for i, n in enumerate([3, 9, 17, 1])], native)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_cuda_fp32_greedy_matches_generate_on_cpu(llama_folder, native):
    """Both forwards on CUDA (torch attention path, fp32) against transformers on CPU."""
    reqs = [Req(f"r{i}", prompt(i, n), MAX_NEW, chunk=7) for i, n in enumerate([3, 9, 17, 1])]
    check_greedy(llama_folder, reqs, native, device="cuda")


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_chunked_prefill_across_steps(llama_folder, native):
    check_greedy(llama_folder, [Req("long", prompt(7, 23), MAX_NEW, chunk=5)], native)


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_decodes_mixed_with_prefill_chunks(llama_folder, native):
    reqs = [
        Req("early", prompt(1, 6), 10),
        Req("late", prompt(2, 19), MAX_NEW, chunk=7, arrival=3),  # chunks run beside "early"'s decodes
        Req("later", prompt(3, 5), MAX_NEW, arrival=4),
    ]
    check_greedy(llama_folder, reqs, native)


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_bf16_greedy_equals_transformers_bf16_up_to_rounding_ties(llama_folder, native):
    reqs = [Req(f"r{i}", prompt(30 + i, n), 12, chunk=5) for i, n in enumerate([3, 9, 17, 6])]
    assert check_bf16_against_transformers(llama_folder, reqs, native) >= 24


def test_fp32_prefill_chunks_through_the_packed_gemm_match_generate(llama_folder):
    """Chunks of FP32_GEMM_ROWS rows or more run the prefill copies, packed for oneDNN (F.linear
    where it packs no fp32)."""
    runner = make_runner(llama_folder)
    copies = [p.prefill for layer in runner.native.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if projections.can_pack(torch.zeros(1)):
        assert all(c is not None and c.packed for c in copies)
    else:
        assert all(c is None for c in copies)
    reqs = [Req(f"r{i}", prompt(50 + i, n), MAX_NEW) for i, n in enumerate([projections.FP32_GEMM_ROWS, 150])]
    check_greedy(llama_folder, reqs, runner=runner)


def test_bf16_prefill_through_the_fp32_gemm_equals_transformers_bf16_up_to_rounding_ties(llama_folder, monkeypatch):
    """Chunks of FP32_GEMM_ROWS rows or more run the fp32 GEMM (forced here, whatever the CPU);
    decodes the bf16 weights."""
    monkeypatch.setattr(projections, "fp32_gemm_is_faster", lambda: True)
    runner = make_runner(llama_folder, dtype=torch.bfloat16)
    assert all(p.prefill is not None for layer in runner.native.layers for p in (layer.qkv, layer.gate_up))
    reqs = [Req(f"r{i}", prompt(40 + i, n), 6) for i, n in enumerate([projections.FP32_GEMM_ROWS, 150])]
    assert check_bf16_against_transformers(llama_folder, reqs, runner=runner) >= 8


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v with a bias
def test_bf16_prefill_through_the_packed_bf16_gemm_equals_transformers_bf16_up_to_rounding_ties(
    kind, request, monkeypatch
):
    """Where widening is not faster, chunks of FP32_GEMM_ROWS rows or more run oneDNN's GEMM over
    bf16 copies packed for it (F.linear where oneDNN packs no bf16)."""
    monkeypatch.setattr(projections, "fp32_gemm_is_faster", lambda: False)
    folder = request.getfixturevalue(f"{kind}_folder")
    runner = make_runner(folder, dtype=torch.bfloat16)
    copies = [p.prefill for layer in runner.native.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if projections.can_pack(torch.zeros(1, dtype=torch.bfloat16)):
        assert all(c is not None and c.packed and c.weight.dtype == torch.bfloat16 for c in copies)
    else:
        assert all(c is None for c in copies)
    reqs = [Req(f"r{i}", prompt(40 + i, n), 6) for i, n in enumerate([projections.FP32_GEMM_ROWS, 150])]
    assert check_bf16_against_transformers(folder, reqs, runner=runner) >= 8


def check_bf16_against_transformers(folder: str, reqs: list[Req], native: bool = True, runner=None) -> int:
    """How many tokens agreed; where our token differs from transformers' own bf16 forward, the
    two were tied within bf16's rounding in transformers' logits (then the texts part, and the
    comparison of that request ends)."""
    done = ToyCore(runner or make_runner(folder, native=native, dtype=torch.bfloat16)).run(reqs)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    compared = 0
    for r in reqs:
        tokens = list(r.prompt)
        for ours in done[r.id].output:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1].float()
            theirs = int(logits.argmax())
            if ours != theirs:
                gap = (logits[theirs] - logits[ours]).item()
                assert gap <= 4 * 2**-8 * max(1.0, abs(logits[theirs].item())), (r.id, len(tokens), gap)
                break
            compared += 1
            tokens.append(ours)
    return compared


def test_head_dim_64_runs_the_vector_kernels(tmp_path):
    """head_dim 64 (SmolLM2's): prefill attention, the decode passes and the panel projections of
    the vector-kernel CPU path (AVX-512 or AVX2), on fresh prompts, chunks over cached tokens and
    decodes beside them."""
    folder = str(save_tiny_model(tiny_config("llama", heads=6, kv_heads=2, head_dim=64), tmp_path / "d64"))
    reqs = [
        Req("fresh", prompt(21, 40), MAX_NEW),
        Req("chunked", prompt(22, 23), MAX_NEW, chunk=9),
        Req("late", prompt(23, 12), MAX_NEW, arrival=2),
    ]
    check_greedy(folder, reqs)


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


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_prompt_logprobs_across_chunks_equal_log_softmax_of_transformers_logits(llama_folder, native):
    sampling = SamplingParams(temperature=0.0, prompt_logprobs=2)
    reqs = [Req("echo", prompt(6, 11), 2, sampling=sampling, chunk=4), Req("plain", prompt(7, 5), 2)]
    done = ToyCore(make_runner(llama_folder, native=native)).run(reqs)
    assert done["plain"].prompt_logprobs == []
    echo = done["echo"]
    assert [start for start, _ in echo.prompt_logprobs] == [1, 5, 9]  # chunks of 4: tokens 1-4, 5-8, 9-10
    token_logprobs = [v for _, lp in echo.prompt_logprobs for v in lp.token_logprobs]
    top_ids = [ids for _, lp in echo.prompt_logprobs for ids in lp.top_token_ids]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    with torch.no_grad():
        expected = model(torch.tensor([echo.prompt])).logits[0].log_softmax(-1)[:-1]
    targets = torch.tensor(echo.prompt[1:])
    assert token_logprobs == pytest.approx(expected.gather(-1, targets[:, None])[:, 0].tolist(), abs=1e-4)
    assert top_ids == expected.topk(2).indices.tolist()
    assert echo.output == reference_generate(llama_folder, echo.prompt, 2)


def test_native_forward_reads_the_hf_parameters_after_an_in_place_update(llama_folder):
    """Q/K/V and gate/up are fused; the HF parameters are views of the fused tensors, so a weight
    update written into them (`param.copy_`) reaches both forwards alike, once the packed copies
    are made again (as the worker does after each update): decodes through the panels, the last
    prompt's prefill (FP32_GEMM_ROWS rows or more) through the prefill copies."""
    runner = make_runner(llama_folder)
    assert runner.native is not None
    layer = runner.model.model.layers[0]
    fused = runner.native.layers[0]
    views = [(layer.self_attn.v_proj.weight, fused.qkv.weight), (layer.mlp.up_proj.weight, fused.gate_up.weight)]
    for param, whole in views:
        assert param.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    reqs = [Req(f"r{i}", prompt(i, n), MAX_NEW) for i, n in enumerate([5, 12, projections.FP32_GEMM_ROWS + 3])]
    before = ToyCore(runner).run(reqs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in runner.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for weight in (attn.v_proj.weight, attn.o_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    runner.native.packed.pack()
    native = ToyCore(runner).run([Req(r.id, r.prompt, r.max_new) for r in reqs])
    runner.native = None
    hf = ToyCore(runner).run([Req(r.id, r.prompt, r.max_new) for r in reqs])
    assert [native[r.id].output for r in reqs] == [hf[r.id].output for r in reqs]
    assert all(native[r.id].output != before[r.id].output for r in reqs)


class InterruptedSteps:
    """Stands in for the worker's InterruptWatcher: these step ids are interrupted."""

    def __init__(self, step_ids: set[int]) -> None:
        self.step_ids = step_ids
        self.asked: set[int] = set()

    def requested(self, step_id: int) -> bool:
        self.asked.add(step_id)
        return step_id in self.step_ids


def test_an_interrupted_step_computes_nothing_and_its_tokens_run_again(llama_folder):
    """Steps 0 (prefill, chunked), 3 (chunk beside a decode) and 7 (decodes) are abandoned between
    layers; the outputs still equal transformers'."""
    runner = make_runner(llama_folder)
    runner.interrupts = InterruptedSteps({0, 3, 7})
    def requests():
        return [Req("a", prompt(21, 11), MAX_NEW, chunk=4), Req("b", prompt(22, 6), MAX_NEW, arrival=2)]

    plain = ToyCore(make_runner(llama_folder))
    plain.run(requests())
    core = ToyCore(runner)
    done = core.run(requests())
    for r in done.values():
        assert r.output == reference_generate(llama_folder, r.prompt, r.max_new), r.id
    assert {0, 3, 7} <= runner.interrupts.asked
    assert core.step_id == plain.step_id + 3  # three steps were run twice


def test_projections_pack_for_onednn_on_cpu_and_fall_back_elsewhere(monkeypatch):
    weight = torch.randn(8, 4)
    x = torch.randn(5, 4)
    projection = projections.Projection(weight, None)
    assert torch.equal(projection(x), F.linear(x, weight))  # not packed yet: F.linear
    if projections.can_pack(weight):
        projections.PackedWeights([projection], prefill=[projection]).pack()
        assert projection.packed is not None and projection.prefill.packed
        assert torch.allclose(projection(x), F.linear(x, weight), atol=1e-5)
        rows = torch.randn(projections.FP32_GEMM_ROWS, 4)
        assert torch.allclose(projection(rows), F.linear(rows, weight), atol=1e-5)
    assert not projections.can_pack(weight.half())
    projections._packing_works.cache_clear()

    def broken(*args):
        raise RuntimeError("no such op")

    monkeypatch.setattr(projections, "onednn_linear", broken)
    try:
        assert not projections.can_pack(weight)
    finally:
        projections._packing_works.cache_clear()
