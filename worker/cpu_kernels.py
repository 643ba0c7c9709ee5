"""C kernels for the CPU path, built once per machine with the system C compiler and called via ctypes.

Plain C against raw data pointers compiles in about a second (torch's C++ headers would take a
minute). The shared object is cached under `$ZEROSERVE_CACHE/kernels/`, named by a hash of its
source, flags and CPU, so an edit or another machine's cache never loads a stale or foreign build.
Without a compiler, or when the build fails, each `load_*()` warns once and returns None, and
its callers keep the torch path. Each kernel reads fp32 or bf16 (all its tensors alike),
computing in fp32.
"""

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protocol.models import cache_root

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
# No -ffast-math: it would let the compiler reorder sums beyond SDPA's rounding; the vector
# reductions come from `omp simd` in the source instead.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")

_RMS_NORM_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
_ROPE_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
_SILU_MUL_ARGTYPES = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
_PREFILL_ARGTYPES = (
    [ctypes.c_void_p] * 6  # q, k, v, out, starts, lens
    + [ctypes.c_int64] * 6  # num_seqs, num_heads, num_kv_heads, head_dim, q_stride, kv_stride
    + [ctypes.c_float, ctypes.c_int]  # scale, num_threads
)
_PANEL_LINEAR_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
_PAGED_DECODE_ARGTYPES = (
    [ctypes.c_void_p] * 6  # q, k_cache, v_cache, block_tables, context_lens, out
    + [ctypes.c_int64] * 6  # num_seqs, num_heads, num_kv_heads, head_dim, max_blocks, block_size
    + [ctypes.c_float, ctypes.c_int]  # scale, num_threads
)


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PagedDecode:
    """The loaded `paged_decode_attention` C functions, by dtype."""

    fns: dict[torch.dtype, Callable[..., int]]

    def __call__(
        self,
        q: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """`out [N, H, D]` = attention of `q [N, H, D]` over each sequence's first `context_lens[i]`
        tokens, read in place from `kv_cache` (`[slots, Hkv, D]` each) through `block_tables [N, B]`."""
        k_cache, v_cache = kv_cache
        _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out)
        num_seqs, num_heads, head_dim = q.shape
        status = self.fns[q.dtype](
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
            num_seqs, num_heads, k_cache.shape[1], head_dim, block_tables.shape[1], block_size,
            scale, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("paged_decode_attention: no memory for its score buffers")


def fits_kernel(*tensors: torch.Tensor) -> bool:
    """The kernels read raw rows: CPU, contiguous, all fp32 or all bf16."""
    dtype = tensors[0].dtype
    if dtype not in KERNEL_DTYPES:
        return False
    for t in tensors:  # a loop, not all(...): a generator per call showed in decode steps' profile
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            return False
    return True


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    # The C side trusts every pointer and size: a wrong layout would read out of bounds, not fail.
    if not fits_kernel(q, k_cache, v_cache, out):
        raise ValueError("paged_decode_attention needs contiguous CPU q, k_cache, v_cache and out, all fp32 or bf16")
    if k_cache.shape != v_cache.shape or out.shape != q.shape or q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"shapes disagree: q {q.shape}, k/v {k_cache.shape}/{v_cache.shape}, out {out.shape}")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {k_cache.shape[1]} KV heads")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.device.type != "cpu" or t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must be a contiguous int64 CPU tensor with one row per query")


@dataclass(frozen=True)
class RMSNormKernel:
    """The loaded `rms_norm` C functions, by dtype."""

    fns: dict[torch.dtype, Callable[..., None]]

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """transformers' RMSNorm of each row of `x` `[..., hidden]`; with `delta`, of x += delta
        (x updated in place, the residual add before the norm)."""
        operands = (x, weight) if delta is None else (x, weight, delta)
        if not fits_kernel(*operands) or x.shape[-1:] != weight.shape or (delta is not None and delta.shape != x.shape):
            raise ValueError(f"rms_norm needs contiguous CPU x [..., {weight.shape[0]}] (and delta alike) and weight "
                             f"of one dtype (fp32 or bf16), got {x.shape} {x.dtype}")  # fmt: skip
        out = torch.empty_like(x)
        rows = x.numel() // weight.shape[0]
        self.fns[x.dtype](x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                          out.data_ptr(), rows, weight.shape[0], eps, torch.get_num_threads())  # fmt: skip
        return out


@dataclass(frozen=True)
class RopeKernel:
    """The loaded `rope` C functions, by dtype."""

    fns: dict[torch.dtype, Callable[..., None]]

    def __call__(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """transformers' RoPE, in place, on heads `[0, heads)` of `x` `[T, H, D]` (its rows may be
        strided: q and k inside the fused q/k/v output), with `cos`, `sin` `[T, D / 2]`."""
        tokens, num_heads, head_dim = x.shape
        rows_fit = x.device.type == "cpu" and x.stride()[1:] == (head_dim, 1) and heads <= num_heads
        half = (tokens, head_dim // 2)
        tables_fit = fits_kernel(cos, sin) and cos.dtype == x.dtype and cos.shape == sin.shape == half
        if not (rows_fit and tables_fit):
            raise ValueError(f"rope needs CPU x [T, H, D] with contiguous heads and contiguous cos, sin "
                             f"[T, D/2] of its dtype, got x {x.shape} {x.stride()} {x.dtype}, "
                             f"cos {cos.shape} {cos.dtype}")  # fmt: skip
        self.fns[x.dtype](x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, x.stride(0), head_dim,
                          torch.get_num_threads())  # fmt: skip


@dataclass(frozen=True)
class SiluMulKernel:
    """The loaded `silu_mul` C functions, by dtype."""

    fns: dict[torch.dtype, Callable[..., None]]

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up `[T, I]` of `gate_up` `[T, 2I]` (gate its first half), as transformers' MLP."""
        if not fits_kernel(gate_up) or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"silu_mul needs a contiguous CPU [T, 2I] fp32 or bf16 tensor, got {gate_up.shape}")
        tokens, width = gate_up.shape
        out = torch.empty(tokens, width // 2, dtype=gate_up.dtype)
        self.fns[gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), tokens, width // 2, torch.get_num_threads())
        return out


# Output columns per panel of `PanelLinear`'s weight layout.
PANEL_COLUMNS = 32


@dataclass(frozen=True)
class PanelLinear:
    """The loaded `panel_linear` C functions (AVX-512 or AVX2 + FMA CPUs), by dtype: linear layers of a few rows
    (decode batches) over a weight laid out in column panels by `panels()`. With `bf16_pairs` (AVX512-BF16
    CPUs) bf16 panels hold k in pairs, for the CPU's bf16 dot-product instruction."""

    fns: dict[torch.dtype, Callable[..., int]]
    bf16_pairs: bool

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return fits_kernel(weight) and weight.dim() == 2 and weight.shape[0] % PANEL_COLUMNS == 0

    def panels(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` `[n, k]` as `[n / 32, k, 32]`: each panel's 32 columns of one k side by side; bf16
        with `bf16_pairs` as `[n / 32, ceil(k / 2), 32, 2]`, each column's two k side by side (a
        zero pads an odd k)."""
        n, k = weight.shape
        if not self._in_pairs(weight.dtype):
            return weight.detach().view(n // PANEL_COLUMNS, PANEL_COLUMNS, k).transpose(1, 2).contiguous()
        padded = F.pad(weight.detach(), (0, k % 2))
        return padded.view(n // PANEL_COLUMNS, PANEL_COLUMNS, -1, 2).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x `[rows, k]` times the weight of `panels` (transposed), plus `bias`: F.linear's result
        up to summation order (in fp32)."""
        groups, k = panels.shape[0], x.shape[-1]
        operands = (x, panels) if bias is None else (x, panels, bias)
        if not fits_kernel(*operands) or x.dim() != 2 or panels.shape != self._panel_shape(groups, k, x.dtype):
            raise ValueError(f"panel_linear needs contiguous CPU x [rows, k] of the panels' dtype and k, "
                             f"got {tuple(x.shape)} {x.dtype} for panels {tuple(panels.shape)}")  # fmt: skip
        rows = x.shape[0]
        out = torch.empty(rows, groups * PANEL_COLUMNS, dtype=x.dtype)
        if rows == 0:
            return out
        status = self.fns[x.dtype](x.data_ptr(), panels.data_ptr(), None if bias is None else bias.data_ptr(),
                                   out.data_ptr(), rows, out.shape[1], k, torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise MemoryError("panel_linear: no memory for its buffers")
        return out

    def _in_pairs(self, dtype: torch.dtype) -> bool:
        return self.bf16_pairs and dtype == torch.bfloat16

    def _panel_shape(self, groups: int, k: int, dtype: torch.dtype) -> tuple[int, ...]:
        if self._in_pairs(dtype):
            return (groups, (k + 1) // 2, PANEL_COLUMNS, 2)
        return (groups, k, PANEL_COLUMNS)


@functools.cache
def load_panel_linear() -> PanelLinear | None:
    """The few-row linear kernels, built on first use; None when they cannot be built or the CPU
    has neither AVX-512 nor AVX2 + FMA (the library then has no such symbol)."""
    if _library() is None or not hasattr(_library(), "panel_linear"):
        return None
    in_pairs = _library().panel_bf16_pairs
    in_pairs.argtypes, in_pairs.restype = [], ctypes.c_int
    return PanelLinear(_c_functions("panel_linear", _PANEL_LINEAR_ARGTYPES, ctypes.c_int), bf16_pairs=in_pairs() == 1)


# The head sizes `PrefillAttention` serves.
PREFILL_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class PrefillAttention:
    """The loaded `prefill_attention` C functions (AVX-512 or AVX2 + FMA CPUs), by dtype: causal attention of
    prefill chunks that have nothing cached, reading q, k and v where they lie."""

    fns: dict[torch.dtype, Callable[..., int]]

    @staticmethod
    def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """q `[T, H, D]`, k and v `[T, Hkv, D]`: CPU, one dtype, heads contiguous within each row,
        k and v rows alike, D 64 or 128."""
        tensors = (q, k, v)
        heads_contiguous = all(t.dim() == 3 and t.stride()[1:] == (t.shape[2], 1) for t in tensors)
        return (
            heads_contiguous
            and q.dtype in KERNEL_DTYPES
            and all(t.device.type == "cpu" and t.dtype == q.dtype for t in tensors)
            and q.shape[2] in PREFILL_HEAD_DIMS
            and k.shape == v.shape
            and k.stride(0) == v.stride(0)
            and q.shape[1] % k.shape[1] == 0
        )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        starts: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Rows `[starts[i], starts[i] + lens[i])` of `out` `[T, H, D]` (contiguous) = causal
        attention of those rows of q over the same rows of k and v (one sequence each)."""
        if not self.fits(q, k, v) or not fits_kernel(out) or out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"prefill_attention needs CPU q [T, H, D], k, v [T, Hkv, D] of one dtype with "
                             f"contiguous heads, D in {PREFILL_HEAD_DIMS}, and a contiguous out like q; got q "
                             f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, out {tuple(out.shape)}")  # fmt: skip
        for name, t in (("starts", starts), ("lens", lens)):
            if t.device.type != "cpu" or t.dtype != torch.int64 or not t.is_contiguous() or t.shape != starts.shape:
                raise ValueError(f"{name} must be a contiguous int64 CPU tensor, one entry per sequence")
        if len(lens) and (int(lens.min()) < 1 or int(starts.min()) < 0 or int((starts + lens).max()) > len(q)):
            raise ValueError(f"sequences (starts {starts.tolist()}, lens {lens.tolist()}) outside {len(q)} rows")
        status = self.fns[q.dtype](
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(), lens.data_ptr(),
            len(starts), q.shape[1], k.shape[1], q.shape[2], q.stride(0), k.stride(0), scale, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("prefill_attention: no memory for its buffers")


@functools.cache
def load_prefill_attention() -> PrefillAttention | None:
    """The prefill attention kernels, built on first use; None when they cannot be built or the
    CPU has neither AVX-512 nor AVX2 + FMA."""
    if _library() is None or not hasattr(_library(), "prefill_attention"):
        return None
    return PrefillAttention(_c_functions("prefill_attention", _PREFILL_ARGTYPES, ctypes.c_int))


@functools.cache
def load_paged_decode() -> PagedDecode | None:
    """The decode attention kernels, built on first use; None when they cannot be built."""
    fns = _c_functions("paged_decode_attention", _PAGED_DECODE_ARGTYPES, ctypes.c_int)
    return None if fns is None else PagedDecode(fns)


@functools.cache
def load_rms_norm() -> RMSNormKernel | None:
    """The RMSNorm kernels, built on first use; None when they cannot be built."""
    fns = _c_functions("rms_norm", _RMS_NORM_ARGTYPES, None)
    return None if fns is None else RMSNormKernel(fns)


@functools.cache
def load_rope() -> RopeKernel | None:
    fns = _c_functions("rope", _ROPE_ARGTYPES, None)
    return None if fns is None else RopeKernel(fns)


@functools.cache
def load_silu_mul() -> SiluMulKernel | None:
    fns = _c_functions("silu_mul", _SILU_MUL_ARGTYPES, None)
    return None if fns is None else SiluMulKernel(fns)


def _c_functions(name: str, argtypes: list, restype: type | None) -> dict[torch.dtype, Callable[..., object]] | None:
    """`name` (fp32) and `name_bf16` from the kernels' library, with their C signature, by dtype;
    None when the library cannot be built."""
    lib = _library()
    if lib is None:
        return None
    fns = {}
    for dtype, symbol in ((torch.float32, name), (torch.bfloat16, f"{name}_bf16")):
        fn = getattr(lib, symbol)
        fn.argtypes = argtypes
        fn.restype = restype
        fns[dtype] = fn
    return fns


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels' shared object, built on first use; None (one warning per process) when it cannot be."""
    try:
        return ctypes.CDLL(_built_library())
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as err:
        detail = getattr(err, "stderr", None) or err
        logger.warning("CPU kernels unavailable, using the torch path: %s", detail)
        return None


def _built_library() -> str:
    """Path of the cached shared object, compiling it first if needed (once, across processes)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + _platform_flags()).encode(), compiler.encode(), _cpu_flags()]))
    folder = os.path.join(cache_root(), "kernels")
    target = os.path.join(folder, f"cpu_kernels-{key.hexdigest()[:16]}.so")
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    # One builder at a time; one that waited finds the file there. The rename makes it appear whole.
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(target):
            _compile(compiler, target)
    return target


def _compile(compiler: str, target: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE, *_platform_flags()], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _platform_flags() -> tuple[str, ...]:
    """Linked libraries: libm, and where glibc has it (x86-64, glibc 2.22 or newer) libmvec with
    ZS_VECTOR_EXPF, under which the source declares the vector expf."""
    libc, version = platform.libc_ver()
    release = tuple(int(part) for part in version.split(".") if part.isdigit())
    if platform.machine() == "x86_64" and libc == "glibc" and release >= (2, 22):
        return ("-lm", "-DZS_VECTOR_EXPF", "-lmvec")
    return ("-lm",)


def _cpu_flags() -> bytes:
    """-march=native bakes in this CPU's instruction sets: a cache shared with another CPU must not match."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""
