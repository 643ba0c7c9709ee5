"""A native forward for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM) on one worker.

It runs on the HF model's own parameters, so loading, GGUF conversion and every later weight
update stay transformers' business. Against `model(...)` it saves what is neither a matmul nor
attention: per-module Python, and the elementwise kernels that allocate a new tensor each. On
CPU (fp32, bf16) the C kernels of `worker.cpu_kernels` fuse them: the residual add with the
RMSNorm after it, RoPE on q and k in place, SiLU(gate) * up; elsewhere torch's ops do it, the
activation in place on the gate/up output. The final norm and the LM head only see the rows that
sample. On CPU a projection of a few rows (decode batches) runs the C kernel `PanelLinear` over
its weight laid out once in column panels (AVX-512 or AVX2 CPUs), else oneDNN over the weight
reordered into the layout it prefers; prefill chunks run oneDNN's GEMM over a packed copy
(`worker.projections`). The copies are made again after every weight update and dropped while
the weights sleep.

Q/K/V and gate/up are fused into one projection each. The HF parameters are then re-pointed
at row slices of the fused tensors, so memory is not doubled and an in-place weight update
(`param.copy_`) reaches both forwards.

Before each layer the forward asks `stop()`, so a pause can abandon the step in flight
(`worker.interrupts`; on CUDA, where the host queues every layer at once, it rarely can).
transformers' path (`model(..., attn_meta=meta)`) still serves everything else: tensor
parallelism, other architectures and activations.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.attention import AttentionMetadata, attend
from worker.cpu_kernels import (
    RMSNormKernel,
    RopeKernel,
    SiluMulKernel,
    fits_kernel,
    load_rms_norm,
    load_rope,
    load_silu_mul,
)
from worker.interrupts import StepInterrupted
from worker.profile import DISABLED, StepTimer
from worker.projections import PackedWeights, Projection

logger = logging.getLogger(__name__)

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
PROJECTIONS, ATTENTION = "forward.projections", "forward.attention"  # the `StepTimer` parts


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

    def add_and_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The norm of `hidden += delta` (the residual add, in place; None adds nothing): one
        pass in the kernel."""
        if delta is None:
            return self(hidden)
        if self.kernel is not None and hidden.is_contiguous() and delta.is_contiguous():
            return self.kernel(hidden, self.weight, self.eps, delta)
        hidden += delta
        return self(hidden)


@dataclass
class Rotary:
    """One step's RoPE tables, cos and sin `[T, head_dim / 2]` (transformers' `[.., D]` tables
    repeat their first half), and the C kernel where it serves their dtype."""

    cos: torch.Tensor
    sin: torch.Tensor
    kernel: RopeKernel | None

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        """RoPE on `x` `[T, heads, D]`: in place by the kernel, else a new tensor."""
        if self.kernel is not None:
            self.kernel(x, x.shape[1], self.cos, self.sin)
            return x
        return apply_rotary(x, self.cos[:, None], self.sin[:, None])


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
        self.silu_mul: SiluMulKernel | None = load_silu_mul() if fits_kernel(self.gate_up.weight) else None

    def __call__(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        rotary: Rotary,
        meta: AttentionMetadata,
        timer: StepTimer,
    ) -> torch.Tensor:
        """The residual stream is `hidden + delta` `[T, hidden]` (no delta before the first
        layer): the layer adds each pending delta into `hidden` as it norms, and returns its
        MLP's output, the next pending delta."""
        x = self.input_norm.add_and_norm(hidden, delta)
        x = self.post_attention_norm.add_and_norm(hidden, self._attention(x, rotary, meta, timer))
        return self._mlp(x, timer)

    def _attention(self, x: torch.Tensor, rotary: Rotary, meta: AttentionMetadata, timer: StepTimer) -> torch.Tensor:
        with timer.part(PROJECTIONS):
            qkv = self.qkv(x).view(x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split_with_sizes([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = rotary.rotated(self.q_norm(q)), rotary.rotated(self.k_norm(k))
        else:  # q and k in one pass, in place where the kernel serves
            qk = rotary.rotated(qkv[:, : self.num_heads + self.num_kv_heads])
            q, k = qk.split_with_sizes([self.num_heads, self.num_kv_heads], dim=1)
        with timer.part(ATTENTION):
            out = attend(self.layer_idx, q, k, v, meta, self.scaling)
        with timer.part(PROJECTIONS):
            return self.o(out.view(x.shape[0], -1))

    def _mlp(self, x: torch.Tensor, timer: StepTimer) -> torch.Tensor:
        with timer.part(PROJECTIONS):
            gate_up = self.gate_up(x)
        if self.silu_mul is not None and gate_up.is_contiguous():
            activated = self.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            activated = F.silu(gate, inplace=True).mul_(up)
        with timer.part(PROJECTIONS):
            return self.down(activated)


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
        self.packed = PackedWeights(projections + [self.lm_head], prefill=projections)
        self.packed.pack()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_indices: torch.Tensor,
        stop: Callable[[], bool] | None = None,
        timer: StepTimer = DISABLED,
    ) -> torch.Tensor:
        """Raises `StepInterrupted` when `stop()` turns true before a layer. `timer` gets the
        projections', attention's and LM head's times (the rest: norms, RoPE, activation)."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        rotary = self._rotary(hidden, positions)
        delta = None
        for layer in self.layers:
            if stop is not None and stop():
                raise StepInterrupted()
            delta = layer(hidden, delta, rotary, meta, timer)
        normed = self.norm.add_and_norm(hidden[sample_indices], delta[sample_indices])
        with timer.part("forward.lm_head"):
            return self.lm_head(normed)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        cos, sin = self.rotary_emb(hidden, positions[None])
        half = cos.shape[-1] // 2
        cos, sin = cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()
        return Rotary(cos, sin, load_rope() if fits_kernel(cos, sin) else None)


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
