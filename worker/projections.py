"""The native forward's projections on CPU, and the copies of their weights made for speed.

A projection of a few rows (decode batches) runs the C kernel `PanelLinear` over its weight laid
out once in column panels (AVX-512 or AVX2 CPUs), else oneDNN over the weight reordered into the
layout it prefers; prefill chunks run oneDNN's GEMM over a copy packed for it (`PrefillWeight`: in
the weight's dtype, or bf16 weights widened to fp32 where that is faster). `PackedWeights` makes the
copies again after every weight update and drops them while the weights sleep.
"""

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.cpu_kernels import KERNEL_DTYPES, fits_kernel, load_panel_linear

logger = logging.getLogger(__name__)

# The batch sizes oneDNN picks the packed layouts for: decode batches, prefill chunks.
PACK_BATCH_HINT = 32
PREFILL_PACK_HINT = 2048
# From this many rows (prefill chunks) a projection runs a GEMM through a copy of its weight packed
# for oneDNN, a bf16 one widened to fp32 where that is faster (`fp32_gemm_is_faster`). Below it
# (decode batches, which read every weight for a few rows) the panel kernel or oneDNN's packed
# weights serve, bf16 reading half the bytes. At 127 rows the panel kernel and MKL took equal time
# (fp32); from 600 to 4800 rows oneDNN's packed fp32 GEMM took 5-17% less time than MKL's (AVX2),
# its packed bf16 GEMM 5-10% less than F.linear's bf16 on SmolLM2's shapes at 4803 rows (Zen 4).
FP32_GEMM_ROWS = 128
FP32_GEMM_MIN_SPEEDUP = 1.2


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


@functools.cache
def fp32_gemm_is_faster() -> bool:
    """Whether this CPU multiplies bf16 matrices of prefill's size faster by widening them to fp32
    (`PrefillWeight`) than in bf16 (oneDNN's packed kernels, or F.linear where they are unavailable),
    by FP32_GEMM_MIN_SPEEDUP at least: 1.5x on an AVX512-BF16 Xeon without AMX, whose bf16 dot
    products run at half the fp32 FMA rate; on an AVX2 CPU without bf16 instructions oneDNN packs
    no bf16 weight and torch's bf16 GEMM converts every tile (a CPU with AMX, whose bf16 tiles
    should win, keeps bf16 when the probe says so: not measured here). The products are exact in
    fp32 either way and both sum in fp32, so the two differ only in summation order. Timed once per
    process, best of a few rounds (about 0.1 s; 0.5 s where torch's bf16 GEMM converts tiles)."""
    x, weight = torch.randn(256, 576, dtype=torch.bfloat16), torch.randn(3072, 576, dtype=torch.bfloat16)
    if _packing_works(torch.bfloat16):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        bf16_s = _best_time(lambda: onednn_linear(x, packed, None))
    else:
        bf16_s = _best_time(lambda: F.linear(x, weight))
    widened = PrefillWeight.of(weight, None, widen=True)
    fp32_s = _best_time(lambda: widened(x))
    faster = bf16_s >= FP32_GEMM_MIN_SPEEDUP * fp32_s
    logger.info("bf16 GEMM %.2f ms, as fp32 %.2f ms: bf16 projections of %d rows or more run %s",
                bf16_s * 1e3, fp32_s * 1e3, FP32_GEMM_ROWS, "as fp32" if faster else "in bf16")  # fmt: skip
    return faster


def _best_time(run: Callable[[], object], rounds: int = 5) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


@dataclass(frozen=True)
class PrefillWeight:
    """A projection's weight and bias for prefill's GEMMs, packed for oneDNN: in the weight's dtype,
    or widened to fp32 (`widen`; then plain for F.linear where oneDNN packs no fp32). Inputs take the
    copy's dtype and results are rounded back to theirs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: bool

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, widen: bool) -> "PrefillWeight | None":
        """None where no copy would help: the weight's own dtype, which oneDNN does not pack."""
        dtype = torch.float32 if widen else weight.dtype
        copy, copy_bias = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)
        if can_pack(copy):
            return cls(torch.ops.mkldnn._reorder_linear_weight(copy, PREFILL_PACK_HINT), copy_bias, packed=True)
        if dtype == weight.dtype:
            return None
        return cls(copy.contiguous(), copy_bias, packed=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.to(self.weight.dtype)
        out = onednn_linear(inputs, self.weight, self.bias) if self.packed else F.linear(inputs, self.weight, self.bias)
        return out.to(x.dtype)


@dataclass
class Projection:
    """One linear layer over the rows of `weight` `[out, in]` (and `bias`). Calls of fewer than
    FP32_GEMM_ROWS rows run through `panels` (the weight in `PanelLinear`'s layout) or `packed`
    (in oneDNN's), whichever `pack()` made; calls of more through `prefill` when it is there,
    else F.linear."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    panels: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    prefill: PrefillWeight | None = None

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
        if x.shape[0] >= FP32_GEMM_ROWS:
            if self.prefill is not None:
                return self.prefill(x)
        elif self.panels is not None and x.is_contiguous():
            return load_panel_linear()(x, self.panels, self.bias)
        elif self.packed is not None:
            return onednn_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def pack(self, prefill: bool, widen: bool) -> None:
        """The copies for decode batches, and with `prefill` for prefill chunks (`widen`: in fp32)."""
        weight = self.weight.detach()
        bias_fits = self.bias is None or fits_kernel(weight, self.bias)
        panel_linear = load_panel_linear()
        if panel_linear is not None and panel_linear.fits(weight) and bias_fits:
            self.panels = panel_linear.panels(weight)
        elif can_pack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        if prefill:
            self.prefill = PrefillWeight.of(weight, self.bias, widen)

    def release(self) -> None:
        self.panels = self.packed = self.prefill = None

    @property
    def has_copies(self) -> bool:
        """Whether `pack()` made a copy for decode batches (it has not been released since)."""
        return self.panels is not None or self.packed is not None


class PackedWeights:
    """The copies of the projections' weights made for speed, a cache of the parameters: in
    column panels or packed for oneDNN (decode batches), and for prefill packed for oneDNN (the
    `prefill` projections only, the LM head sees the sampling rows): the weights' bytes once more,
    or twice bf16 weights' bytes where widening them is faster. `pack()` makes them (again, after
    the parameters changed); `release()` drops them (sleep), leaving F.linear."""

    def __init__(self, projections: list[Projection], prefill: list[Projection]) -> None:
        self.projections = [p for p in projections if p.weight.device.type == "cpu" and p.weight.dtype in KERNEL_DTYPES]
        self.prefill = {id(p) for p in prefill}

    def pack(self) -> None:
        for projection in self.projections:
            widen = projection.weight.dtype != torch.float32 and fp32_gemm_is_faster()
            projection.pack(prefill=id(projection) in self.prefill, widen=widen)

    def release(self) -> None:
        for projection in self.projections:
            projection.release()

    def warm_up(self, max_rows: int) -> None:
        """Call each shape of the layers' projections that oneDNN serves once for every row count
        up to `max_rows` (decode batches): oneDNN builds a kernel for each new shape on its first
        call (about 1 ms each, 30 layers share it). Not the LM head's, whose every call computes
        10x longer than that and whose warm-up took 3 s. The panel kernel needs none."""
        started = time.perf_counter()
        onednn = [p for p in self.projections if id(p) in self.prefill and p.packed is not None]
        shapes = {(p.weight.shape, p.weight.dtype): p for p in onednn}
        for (shape, dtype), projection in shapes.items():
            rows = torch.zeros(min(max_rows, FP32_GEMM_ROWS - 1), shape[1], dtype=dtype)
            for count in range(1, len(rows) + 1):
                projection(rows[:count])
        logger.info("warmed %d projection shapes for 1-%d rows in %.2f s", len(shapes), max_rows,
                    time.perf_counter() - started)  # fmt: skip
