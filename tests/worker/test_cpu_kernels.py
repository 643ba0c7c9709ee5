"""The C kernels (paged decode against SDPA over gathered rows, RMSNorm against transformers') and
their fallback to the torch path."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformers.models.llama.modeling_llama import LlamaRMSNorm

from worker import attention, cpu_kernels
from worker.attention import build_metadata, paged_attention
from worker.kv_cache import KVCache, allocate_kv_cache

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 16
NUM_BLOCKS = 40
# 1 token, a block less one, one block, several blocks, uneven lengths.
CONTEXT_LENS = [1, BLOCK - 1, BLOCK, 3 * BLOCK, 2 * BLOCK + 1, 37]


@pytest.fixture(scope="module")
def kernel() -> cpu_kernels.PagedDecode:
    loaded = cpu_kernels.load_paged_decode()
    if loaded is None:
        pytest.skip("no C compiler: the kernel falls back to the torch path")
    return loaded


@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 64), (300, 576)])  # 300 x 576: several threads
def test_rms_norm_equals_transformers(rows, hidden):
    kernel = cpu_kernels.load_rms_norm()
    if kernel is None:
        pytest.skip("no C compiler: RMSNorm falls back to torch")
    g = torch.Generator().manual_seed(rows)
    reference = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(hidden, generator=g))
    x = torch.randn(rows, hidden, generator=g) * 3
    ours = kernel(x, reference.weight.detach(), 1e-5)
    assert (ours - reference(x).detach()).abs().max().item() <= 1e-5
    reference.to(torch.bfloat16)
    x = x.bfloat16()
    ours = kernel(x, reference.weight.detach(), 1e-5)
    expected = reference(x).detach()
    # Both round twice to bf16; a sum in another order may flip a last bit now and then.
    assert ours.dtype == torch.bfloat16 and (ours.float() - expected.float()).abs().max().item() <= 0.02
    assert (ours == expected).float().mean().item() > 0.99


def loaded(kernel):
    if kernel is None:
        pytest.skip("no C compiler: torch serves")
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 300])  # 300 x 576: several threads
def test_residual_add_and_rms_norm_equal_torchs_add_then_transformers_norm(dtype, rows):
    kernel = loaded(cpu_kernels.load_rms_norm())
    g = torch.Generator().manual_seed(rows)
    reference = LlamaRMSNorm(576, eps=1e-6).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(576, generator=g))
    hidden, delta = (torch.randn(rows, 576, generator=g).to(dtype) * 3 for _ in range(2))
    added = hidden + delta
    ours = kernel(hidden, reference.weight.detach(), 1e-6, delta)
    assert torch.equal(hidden, added)  # the add, in place, rounded as torch's
    expected = reference(added).detach()
    assert (ours.float() - expected.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, 200])
def test_rope_in_place_equals_transformers_rotation(dtype, tokens):
    """On q and k inside a fused q/k/v row (strided rows), v untouched; bf16 rounds each product
    and sum as torch's ops do, so it matches them exactly."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kernel = loaded(cpu_kernels.load_rope())
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, DIM, generator=g).to(dtype)
    angles = torch.rand(tokens, DIM // 2, generator=g) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    full_cos, full_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # [1, T, D]
    q, k = qkv[None, :, :HEADS].transpose(1, 2), qkv[None, :, HEADS : HEADS + KV_HEADS].transpose(1, 2)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, full_cos, full_sin)
    v = qkv[:, HEADS + KV_HEADS :].clone()
    kernel(qkv, HEADS + KV_HEADS, cos, sin)
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    for ours, expected in ((qkv[:, :HEADS], expected_q), (qkv[:, HEADS : HEADS + KV_HEADS], expected_k)):
        assert (ours.float() - expected[0].transpose(0, 1).float()).abs().max().item() <= tolerance
    assert torch.equal(qkv[:, HEADS + KV_HEADS :], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 100])
def test_silu_mul_equals_torchs(dtype, tokens):
    kernel = loaded(cpu_kernels.load_silu_mul())
    gate_up = torch.randn(tokens, 2 * 1536, generator=torch.Generator().manual_seed(tokens)).to(dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    ours = kernel(gate_up)
    # fp32: another expf; bf16: that may flip a rounding now and then.
    assert (ours.float() - expected.float()).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.07)
    if dtype == torch.bfloat16:
        assert (ours == expected).float().mean().item() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, out_features, in_features, bias", [
    (1, 32, 7, False), (13, 96, 200, True), (20, 576, 1536, False), (127, 960, 576, True),
])  # fmt: skip
def test_panel_linear_equals_f_linear(dtype, rows, out_features, in_features, bias):
    """Against fp64: fp32 within F.linear's own error (2x); bf16 F.linear's result but for ties."""
    kernel = cpu_kernels.load_panel_linear()
    if kernel is None:
        pytest.skip("no C compiler or no AVX-512 or AVX2: projections keep oneDNN")
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    x, weight = x.to(dtype), weight.to(dtype)
    ours, theirs = kernel(x, kernel.panels(weight), b), F.linear(x, weight, b)
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    if dtype == torch.float32:
        assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 1e-6
    else:
        # Off from the exact value by F.linear's error plus one bf16 spacing and the error bound of
        # fp32 sums in another order (which dominates where the products cancel).
        ulp = 2.0 ** (torch.frexp(exact.abs().float())[1] - 8).double()
        sums = in_features * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
        assert ((ours.double() - exact).abs() <= (theirs.double() - exact).abs() + ulp + sums).all()
        assert (ours == theirs).float().mean().item() > 0.99
    assert kernel(x[:0], kernel.panels(weight), b).shape == (0, out_features)


def test_panel_linear_refuses_what_it_cannot_read():
    kernel = cpu_kernels.load_panel_linear()
    if kernel is None:
        pytest.skip("no C compiler or no AVX-512 or AVX2: projections keep oneDNN")
    panels = kernel.panels(torch.randn(64, 16))
    with pytest.raises(ValueError, match="panel_linear needs"):
        kernel(torch.randn(3, 17), panels, None)
    with pytest.raises(ValueError, match="panel_linear needs"):
        kernel(torch.randn(3, 16).to(torch.bfloat16), panels, None)
    assert not kernel.fits(torch.randn(40, 16)) and kernel.fits(torch.randn(64, 16))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
def test_prefill_attention_equals_causal_sdpa(dtype, tolerance, heads, kv_heads, dim):
    """Sequences of 1 token, under a query block, several blocks, over a key tile, over a softmax
    vector, packed with two decode rows between them that the kernel leaves alone."""
    kernel = cpu_kernels.load_prefill_attention()
    if kernel is None:
        pytest.skip("no C compiler or no AVX-512 or AVX2: prefill attention keeps SDPA")
    lens, gap = [1, 5, 8, 33, 70], 2
    starts = [sum(lens[:i]) + gap * i for i in range(len(lens))]
    g = torch.Generator().manual_seed(dim)
    qkv = torch.randn(starts[-1] + lens[-1], heads + 2 * kv_heads, dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # strided rows, as the fused projection leaves them
    out = torch.full(q.shape, 7.0, dtype=dtype)
    scale = 1.1 / dim**0.5
    kernel(q, k, v, torch.tensor(starts), torch.tensor(lens), scale, out)
    for start, n in zip(starts, lens):
        rows = slice(start, start + n)
        qc, kc, vc = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        expected = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        expected = expected[0].transpose(0, 1).float()
        assert ((out[rows].float() - expected).abs() <= tolerance * expected.abs().clamp(min=1)).all()
        assert (out[start + n : start + n + gap] == 7.0).all()


def test_prefill_attention_refuses_what_it_cannot_read():
    kernel = cpu_kernels.load_prefill_attention()
    if kernel is None:
        pytest.skip("no C compiler or no AVX-512 or AVX2: prefill attention keeps SDPA")
    q, kv = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    one = torch.tensor([0]), torch.tensor([4])
    assert not kernel.fits(torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.randn(4, 1, 16))
    assert not kernel.fits(q.transpose(0, 1).contiguous().transpose(0, 1), kv, kv)  # heads not contiguous
    with pytest.raises(ValueError, match="prefill_attention needs"):
        kernel(q, kv, kv, *one, 0.1, torch.empty(4, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="outside 4 rows"):
        kernel(q, kv, kv, torch.tensor([2]), torch.tensor([3]), 0.1, torch.empty_like(q))


def random_tables(lens: list[int], generator: torch.Generator) -> torch.Tensor:
    """Each sequence gets distinct, shuffled (non-sequential) block ids; rows padded with block 0."""
    needed = [-(-n // BLOCK) for n in lens]
    ids = torch.randperm(NUM_BLOCKS, generator=generator)[: sum(needed)].tolist()
    tables = torch.zeros(len(lens), max(needed), dtype=torch.long)
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor(ids[:count])
        ids = ids[count:]
    return tables


def sdpa_reference(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """Per sequence: gather its context rows in order, then SDPA with GQA."""
    out = []
    for row, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[row, pos // BLOCK] * BLOCK + pos % BLOCK
        k, v = (c[slots].transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, Hkv, n, D]
        o = F.scaled_dot_product_attention(q[row][None, :, None], k, v, scale=scale, enable_gqa=True)
        out.append(o[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("heads, kv_heads, dim", [
    (HEADS, KV_HEADS, DIM),  # the scalar passes
    (9, 3, 64),  # SmolLM2: the vector passes, 3 query heads a pass
    (8, 2, 128),  # passes of 3 then 1 query heads
    (4, 4, 64),  # no grouping
])  # fmt: skip
def test_kernel_equals_sdpa(kernel, dtype, tolerance, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS * BLOCK, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(len(CONTEXT_LENS), heads, dim, generator=g).to(dtype)
    tables = random_tables(CONTEXT_LENS, g)
    lens = torch.tensor(CONTEXT_LENS)
    out = torch.full_like(q, float("nan"))
    scale = 1.2 / dim**0.5
    kernel(q, (k_cache, v_cache), tables, lens, BLOCK, scale, out)
    # bf16: SDPA's own bf16 result, whose output is rounded to bf16 as the kernel's is (one ulp apart
    # at most: 2**-7 relative, from 1 up).
    expected = sdpa_reference(q, k_cache, v_cache, tables, CONTEXT_LENS, scale).float()
    assert ((out.float() - expected).abs() <= tolerance * expected.abs().clamp(min=1)).all()


def test_kernel_refuses_wrong_layouts(kernel):
    q = torch.randn(1, HEADS, DIM)
    cache = torch.randn(BLOCK, KV_HEADS, DIM)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.tensor([1])
    with pytest.raises(ValueError, match="contiguous CPU q"):
        kernel(q.transpose(1, 2).contiguous().transpose(1, 2), (cache, cache), tables, lens, BLOCK, 1.0, q.clone())
    with pytest.raises(ValueError, match="int64"):
        kernel(q, (cache, cache), tables.int(), lens, BLOCK, 1.0, q.clone())


def mixed_step(generator: torch.Generator):
    """A packed step: decodes around one prefill chunk with 5 cached tokens; K/V of the step included."""
    lens = [9, 6 + 5, 1, 17]  # the second is the chunk: 5 cached + 6 new
    query_lens = [1, 6, 1, 1]
    tables = random_tables(lens, generator)
    keys, values = ([torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, DIM, generator=generator)] for _ in range(2))
    cache = KVCache(keys=keys, values=values, block_size=BLOCK, num_blocks=NUM_BLOCKS)
    starts = [0, 1, 7, 8]
    positions = torch.cat([torch.arange(n - q, n) for n, q in zip(lens, query_lens)])
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(query_lens))
    slots = tables[rows, positions // BLOCK] * BLOCK + positions % BLOCK
    return cache, (slots, starts, query_lens, torch.tensor(lens), tables)


def step_qkv(step, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k and v of a step's tokens."""
    tokens = sum(step[2])
    q = torch.randn(1, HEADS, tokens, DIM, generator=generator)
    return q, *(torch.randn(1, KV_HEADS, tokens, DIM, generator=generator) for _ in range(2))


def run_layer(cache: KVCache, step, qkv) -> torch.Tensor:
    module = torch.nn.Module()
    module.layer_idx = 0
    meta = build_metadata(cache, *step)
    return paged_attention(module, *qkv, None, scaling=0.25, attn_meta=meta)[0]


def test_kernel_path_equals_torch_path(kernel, monkeypatch):
    g = torch.Generator().manual_seed(1)
    cache, step = mixed_step(g)
    qkv = step_qkv(step, g)
    fast_cache = KVCache([cache.keys[0].clone()], [cache.values[0].clone()], BLOCK, NUM_BLOCKS)
    fast = run_layer(fast_cache, step, qkv)
    assert build_metadata(fast_cache, *step).decode_kernel is kernel
    monkeypatch.setattr(attention, "load_paged_decode", lambda: None)
    slow = run_layer(cache, step, qkv)
    assert (fast - slow).abs().max().item() <= 1e-5


def test_slots_no_step_wrote_are_never_read(kernel, monkeypatch):
    """NaN in every slot outside the sequences' contexts but slot 0 (the torch path's padding, which
    the cache is allocated zeroed for) changes neither path's output."""
    allocated = allocate_kv_cache(NUM_BLOCKS, BLOCK, (1, KV_HEADS, DIM), torch.float32, torch.device("cpu"))
    assert allocated.keys[0].eq(0).all() and allocated.values[0].eq(0).all()
    g = torch.Generator().manual_seed(2)
    cache, step = mixed_step(g)
    qkv = step_qkv(step, g)
    lens, tables = step[3], step[4]
    positions = [torch.arange(n) for n in lens.tolist()]
    context = torch.cat([tables[i, p // BLOCK] * BLOCK + p % BLOCK for i, p in enumerate(positions)])
    unread = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool)
    unread[context] = False
    unread[0] = False
    assert unread.any()

    def poisoned() -> KVCache:
        keys, values = cache.keys[0].clone(), cache.values[0].clone()
        keys[unread], values[unread] = float("nan"), float("nan")
        return KVCache([keys], [values], BLOCK, NUM_BLOCKS)

    clean = run_layer(KVCache([cache.keys[0].clone()], [cache.values[0].clone()], BLOCK, NUM_BLOCKS), step, qkv)
    fast = run_layer(poisoned(), step, qkv)
    monkeypatch.setattr(attention, "load_paged_decode", lambda: None)
    slow = run_layer(poisoned(), step, qkv)
    assert torch.equal(fast, clean) and slow.isfinite().all()
    assert (fast - slow).abs().max().item() <= 1e-5


def clear_loaders() -> None:
    for loader in (cpu_kernels._library, cpu_kernels.load_paged_decode, cpu_kernels.load_rms_norm):
        loader.cache_clear()


def test_no_compiler_warns_once_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ZEROSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    clear_loaders()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert cpu_kernels.load_paged_decode() is None
            assert cpu_kernels.load_rms_norm() is None
            assert cpu_kernels.load_paged_decode() is None
    finally:
        clear_loaders()
    assert [r.message.startswith("CPU kernels unavailable") for r in caplog.records] == [True]


def test_build_is_cached_and_leaves_no_temporaries(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSERVE_CACHE", str(tmp_path))
    built = Path(cpu_kernels._built_library())
    mtime = built.stat().st_mtime_ns
    assert Path(cpu_kernels._built_library()) == built and built.stat().st_mtime_ns == mtime
    assert built.parent == tmp_path / "kernels"
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, built.name + ".lock"]
