"""A native forward for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM) on one worker.

It runs on the HF model's own parameters, so loading, GGUF conversion and every later weight
update stay transformers' business. Against `model(...)` it saves what is neither a matmul nor
attention: per-module Python, and the elementwise kernels that allocate a new tensor each
(rotate_half's cat, RMSNorm's casts, act(gate) * up). The MLP's activation runs in place on
the gate/up output, the final norm and the LM head only see the rows that sample. On CPU the
projections run through oneDNN over weights reordered once into the layout it prefers
(`PackedWeights`: 1.2-2x faster than plain weights at decode batch sizes, fp32 and bf16); the
packed copies are made again after every weight update and dropped while the weights sleep.

Q/K/V and gate/up are fused into one projection each. The HF parameters are then re-pointed
at row slices of the fused tensors, so memory is not doubled and an in-place weight update
(`param.copy_`) reaches both forwards.

Before each layer the forward asks `stop()`, so a pause can abandon the step in flight
(`worker.interrupts`; on CUDA, where the host queues every layer at once, it rarely can). transformers' path (`model(..., attn_meta=meta)`) still serves everything
else: tensor parallelism, other architectures and activations.
"""

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.attention import AttentionMetadata, attend
from worker.cpu_kernels import RMSNormKernel, fits_kernel, load_rms_norm
from worker.interrupts import StepInterrupted

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin `[T, 1, head_dim / 2]`


@dataclass
class RMSNorm:
    weight: torch.Tensor
    eps: float
    kernel: RMSNormKernel | None  # the C kernel, for fp32 CPU weights

    @classmethod
    def of(cls, module: torch.nn.Module) -> "RMSNorm":
        kernel = load_rms_norm() if fits_kernel(module.weight) else None
        return cls(module.weight, module.variance_epsilon, kernel)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.is_contiguous():
            return self.kernel(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # transformers rounds the normalised value to x's dtype before the weight multiplies it.
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight


# The batch size oneDNN picks the packed layout for: decode batches. It served prefill's
# thousands of rows as well as a layout for those did (SmolLM2's shapes, fp32 and bf16).
PACK_BATCH_HINT = 32


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear; `weight` plain `[out, in]` or packed by `torch.ops.mkldnn._reorder_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN's packed linear serves `weight` here (fp32 or bf16 on CPU) and gives
    F.linear's result. The ops are internal to torch (its compiler uses them), so they are tried
    once per dtype before they are trusted."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    return _packing_works(weight.dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    probe, weight = torch.randn(3, 64).to(dtype), torch.randn(16, 64).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        works = torch.allclose(onednn_linear(probe, packed, None).float(), F.linear(probe, weight).float(), atol=1e-2)
    except (AttributeError, RuntimeError):
        works = False
    if not works:
        logger.info("oneDNN's packed linear is unavailable for %s: F.linear serves", dtype)
    return works


@dataclass
class Projection:
    """One linear layer over the rows of `weight` `[out, in]` (and `bias`); through `packed`, the
    weight in oneDNN's layout, when it is there."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, module: torch.nn.Linear) -> "Projection":
        return cls(module.weight, module.bias)

    @classmethod
    def fused(cls, modules: list[torch.nn.Linear]) -> "Projection":
        """One projection for several that read the same input; the modules' parameters become
        views of its rows."""
        weight = torch.cat([m.weight.detach() for m in modules])
        has_bias = [m.bias is not None for m in modules]
        if any(has_bias) and not all(has_bias):
            raise ValueError("cannot fuse projections where only some have a bias")
        bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
        start = 0
        for module in modules:
            rows = slice(start, start + module.weight.shape[0])
            module.weight.data = weight[rows]
            if bias is not None:
                module.bias.data = bias[rows]
            start = rows.stop
        return cls(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return onednn_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH_HINT)


class PackedWeights:
    """The packed copies of the projections' weights, a cache of the parameters: `pack()` makes
    them (again, after the parameters changed); `release()` drops them (sleep), leaving F.linear."""

    def __init__(self, projections: list[Projection]) -> None:
        self.projections = [p for p in projections if can_pack(p.weight)]

    def pack(self) -> None:
        for projection in self.projections:
            projection.pack()

    def release(self) -> None:
        for projection in self.projections:
            projection.packed = None


class DecoderLayer:
    def __init__(self, layer: torch.nn.Module, layer_idx: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = layer_idx
        self.input_norm = RMSNorm.of(layer.input_layernorm)
        self.post_attention_norm = RMSNorm.of(layer.post_attention_layernorm)
        self.qkv = Projection.fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Projection.of(attn.o_proj)
        self.q_norm = RMSNorm.of(attn.q_norm) if hasattr(attn, "q_norm") else None  # Qwen3
        self.k_norm = RMSNorm.of(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.gate_up = Projection.fused([mlp.gate_proj, mlp.up_proj])
        self.down = Projection.of(mlp.down_proj)
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.weight.shape[0] // self.head_dim
        self.num_kv_heads = attn.k_proj.weight.shape[0] // self.head_dim
        self.scaling = attn.scaling

    def __call__(self, hidden: torch.Tensor, rotary: Rotary, meta: AttentionMetadata) -> torch.Tensor:
        """`hidden` `[T, hidden]` is updated in place (each sub-block adds to its residual)."""
        hidden += self._attention(self.input_norm(hidden), rotary, meta)
        hidden += self._mlp(self.post_attention_norm(hidden))
        return hidden

    def _attention(self, x: torch.Tensor, rotary: Rotary, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv(x).view(len(x), self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = attend(self.layer_idx, q, k, v, meta, self.scaling)
        return self.o(out.view(len(x), -1))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate, inplace=True).mul_(up))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x` `[T, heads, D]` with `cos`/`sin` `[T, 1, D/2]`: the same products and sums as
    transformers' `x * cos + rotate_half(x) * sin`, without building rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class NativeLlama:
    """`forward(input_ids, positions, meta, sample_indices)` -> logits `[S, V]` of the sampling rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        base = model.model
        self.embed_tokens = base.embed_tokens.weight
        self.rotary_emb = base.rotary_emb  # transformers' RoPE, with every scaling type it knows
        self.layers = [DecoderLayer(layer, i) for i, layer in enumerate(base.layers)]
        self.norm = RMSNorm.of(base.norm)
        self.lm_head = Projection.of(model.lm_head)
        projections = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.packed = PackedWeights(projections + [self.lm_head])
        self.packed.pack()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_indices: torch.Tensor,
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Raises `StepInterrupted` when `stop()` turns true before a layer."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        rotary = self._rotary(hidden, positions)
        for layer in self.layers:
            if stop is not None and stop():
                raise StepInterrupted()
            hidden = layer(hidden, rotary, meta)
        return self.lm_head(self.norm(hidden[sample_indices]))

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        """cos and sin `[T, 1, D/2]`: transformers' `[.., D]` tables repeat their first half."""
        cos, sin = self.rotary_emb(hidden, positions[None])
        half = cos.shape[-1] // 2
        return cos[0, :, None, :half], sin[0, :, None, :half]


def native_model(model: torch.nn.Module) -> NativeLlama | None:
    """The native forward for `model`, or None (with the reason logged) where transformers' serves."""
    config = model.config
    reason = None
    if config.model_type not in MODEL_TYPES:
        reason = f"model type {config.model_type!r}"
    elif getattr(config, "hidden_act", "silu") != "silu":
        reason = f"activation {config.hidden_act!r}"
    if reason is not None:
        logger.info("%s: no native forward, serving with transformers' forward", reason)
        return None
    logger.info("native forward for %s (%d layers)", config.model_type, config.num_hidden_layers)
    return NativeLlama(model)
