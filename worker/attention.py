"""Paged attention for transformers' attention interface.

The model runs one packed batch `[1, T]` mixing prefill chunks and decodes. Each step's
`AttentionMetadata` reaches `paged_attention` as the `attn_meta` kwarg of `model(...)`,
together with `module.layer_idx`. Per layer:

    1. write this step's K/V at `slot_mapping` (slot = block_id * block_size + offset);
    2. decodes (1 query token): on CPU (fp32, bf16), the C kernel of `worker.cpu_kernels`, which reads
       each sequence's K/V blocks in place; elsewhere (CUDA, other dtypes, no C compiler) one
       batched SDPA over K/V gathered by slot, padded to the longest context, padding masked out;
    3. prefill chunks: the chunk's earlier cached tokens are all visible, its own tokens
       causally. Chunks with nothing cached go to the C kernel at once on AVX-512 or AVX2 CPUs (head_dim
       64 or 128), reading q/k/v where they lie; the others, each its own SDPA.

The gather indices and masks are built once per step (`build_metadata`) and shared by all layers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

from worker.cpu_kernels import PagedDecode, PrefillAttention, fits_kernel, load_paged_decode, load_prefill_attention
from worker.kv_cache import KVCache

# Our own name: a name transformers knows ("sdpa") would make it build a [T, T] mask each step.
ATTENTION_NAME = "zeroserve_paged"


@dataclass
class PrefillChunk:
    """Query tokens `[start, end)` of the packed batch; keys are context slots `slots`."""

    start: int
    end: int
    slots: torch.Tensor  # [ctx] slots of the whole context (cached + this chunk)
    mask: torch.Tensor | None  # [q, ctx] bool, None when nothing was cached (plain causal)


@dataclass
class AttentionMetadata:
    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    decode_tokens: torch.Tensor  # [Nd] positions of decode tokens in the packed batch
    decode_kernel: PagedDecode | None  # None: the torch path, through decode_slots / decode_mask
    decode_block_tables: torch.Tensor  # [Nd, max_blocks] (kernel path)
    decode_context_lens: torch.Tensor  # [Nd] (kernel path)
    decode_slots: torch.Tensor | None  # [Nd, L] context slots, padded (torch path)
    decode_mask: torch.Tensor | None  # [Nd, 1, 1, L] bool, False on padding (torch path)
    prefills: list[PrefillChunk]
    prefill_kernel: PrefillAttention | None  # for the chunks with nothing cached, where it fits
    fresh_starts: torch.Tensor  # [Nf] first token of each chunk with nothing cached (kernel path)
    fresh_lens: torch.Tensor  # [Nf] its length


def context_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int):
    """Slots of each sequence's context, `[N, L]` padded with slot 0, and the `[N, L]` validity mask."""
    length = int(context_lens.max()) if len(context_lens) else 0
    pos = torch.arange(length, device=block_tables.device)
    blocks = block_tables[:, pos // block_size]
    slots = blocks * block_size + pos % block_size
    valid = pos[None, :] < context_lens[:, None]
    return torch.where(valid, slots, 0), valid


def build_metadata(
    kv_cache: KVCache,
    slot_mapping: torch.Tensor,
    query_starts: list[int],
    query_lens: list[int],
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> AttentionMetadata:
    """Split the step's sequences into decodes and prefill chunks and precompute their indices."""
    block_size = kv_cache.block_size
    is_decode = [q == 1 for q in query_lens]
    decode_rows = torch.tensor([i for i, d in enumerate(is_decode) if d], dtype=torch.long)
    decode_rows = decode_rows.to(block_tables.device)
    decode_tables, decode_lens = block_tables[decode_rows].contiguous(), context_lens[decode_rows].contiguous()
    kernel = _decode_kernel(kv_cache)
    decode_slots = valid = None
    if kernel is None:
        decode_slots, valid = context_slots(decode_tables, decode_lens, block_size)
        valid = valid[:, None, None, :]
    decode_tokens = torch.tensor([s for s, d in zip(query_starts, is_decode) if d], dtype=torch.long)
    prefills = [
        _prefill_chunk(query_starts[i], query_lens[i], int(context_lens[i]), block_tables[i], block_size)
        for i, d in enumerate(is_decode)
        if not d
    ]
    fresh = [chunk for chunk in prefills if chunk.mask is None]
    return AttentionMetadata(
        kv_cache=kv_cache,
        slot_mapping=slot_mapping,
        decode_tokens=decode_tokens.to(block_tables.device),
        decode_kernel=kernel,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        decode_slots=decode_slots,
        decode_mask=valid,
        prefills=prefills,
        prefill_kernel=load_prefill_attention() if fresh and block_tables.device.type == "cpu" else None,
        fresh_starts=torch.tensor([chunk.start for chunk in fresh], dtype=torch.long),
        fresh_lens=torch.tensor([chunk.end - chunk.start for chunk in fresh], dtype=torch.long),
    )


def _decode_kernel(kv_cache: KVCache) -> PagedDecode | None:
    """The C decode kernel when the cache is one it can read (every layer is allocated alike)."""
    if not fits_kernel(kv_cache.keys[0], kv_cache.values[0]):
        return None
    return load_paged_decode()


def _prefill_chunk(start: int, q_len: int, ctx_len: int, block_table: torch.Tensor, block_size: int):
    device = block_table.device
    slots, _ = context_slots(block_table[None], torch.tensor([ctx_len], device=device), block_size)
    cached = ctx_len - q_len
    mask = None
    if cached:
        # Query i sits at position cached + i and sees keys 0..cached + i.
        q_pos = torch.arange(q_len, device=device)[:, None] + cached
        mask = torch.arange(ctx_len, device=device)[None, :] <= q_pos
    return PrefillChunk(start=start, end=start + q_len, slots=slots[0], mask=mask)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    attn_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' seam: `query` `[1, H, T, D]`, `key`/`value` `[1, Hkv, T, D]` -> `[1, T, H, D]`."""
    if attn_meta is None:
        raise ValueError(f"{ATTENTION_NAME} attention needs attn_meta=AttentionMetadata(...)")
    # [1, heads, T, D] -> [T, heads, D], the cache's row layout
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return attend(module.layer_idx, q, k, v, attn_meta, scaling)[None], None


def attend(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scaling: float | None
) -> torch.Tensor:
    """Write this step's `k`, `v` `[T, Hkv, D]` into layer `layer_idx`'s cache, then attend with
    `q` `[T, H, D]` over each sequence's context; returns `[T, H, D]`."""
    k_cache, v_cache = meta.kv_cache.layer(layer_idx)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if len(meta.decode_tokens):
        _decode(q, out, k_cache, v_cache, meta, scaling)
    kernel = meta.prefill_kernel
    fresh_done = kernel is not None and kernel.fits(q, k, v)
    if fresh_done:
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        kernel(q, k, v, meta.fresh_starts, meta.fresh_lens, scale, out)
    for chunk in meta.prefills:
        if not (fresh_done and chunk.mask is None):
            _prefill(q, out, (k, v), (k_cache, v_cache), chunk, scaling)
    return out


def _decode(q, out, k_cache, v_cache, meta: AttentionMetadata, scaling) -> None:
    only_decodes = not meta.prefills  # then the decode tokens are the batch, in order
    qd = q if only_decodes else q[meta.decode_tokens]  # [Nd, H, D]
    if meta.decode_kernel is not None:
        qd = qd.contiguous()
        od = out if only_decodes else torch.empty_like(qd, memory_format=torch.contiguous_format)
        scale = scaling if scaling is not None else qd.shape[-1] ** -0.5
        meta.decode_kernel(
            qd, (k_cache, v_cache), meta.decode_block_tables, meta.decode_context_lens,
            meta.kv_cache.block_size, scale, od,
        )  # fmt: skip
    else:
        kd, vd = (_gather(cache, meta.decode_slots).transpose(1, 2) for cache in (k_cache, v_cache))  # [Nd, Hkv, L, D]
        od = F.scaled_dot_product_attention(
            qd[:, :, None, :], kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True
        )[:, :, 0, :]
    if od is not out:
        out.index_copy_(0, meta.decode_tokens, od)


def _prefill(q, out, new_kv, cache_kv, chunk: PrefillChunk, scaling) -> None:
    qc = q[chunk.start : chunk.end].transpose(0, 1)[None]  # [1, H, q, D]
    if chunk.mask is None:
        # Nothing cached: the chunk's own K/V, plain causal attention, no gather.
        k, v = (t[chunk.start : chunk.end] for t in new_kv)
    else:
        k, v = (_gather(t, chunk.slots) for t in cache_kv)
    k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, ctx, D]
    o = F.scaled_dot_product_attention(
        qc, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scaling, enable_gqa=True
    )
    out[chunk.start : chunk.end] = o[0].transpose(0, 1)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of `cache` at `slots` (any shape), as `[*slots.shape, Hkv, D]`; index_select is the fastest copy."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def register_attention() -> None:
    """Make `attn_implementation=ATTENTION_NAME` available to every transformers model."""
    transformers.AttentionInterface.register(ATTENTION_NAME, paged_attention)
