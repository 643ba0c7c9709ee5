"""The weights vocabulary: utility arguments for weight updates, weight groups and sleep; the
commands the core sends every worker rank for them; and the byte layout of packed buckets.

    update_weights(path | group)         core ──BeginWeights──▶ every rank ──WorkerReply──▶ core
                                          core ──EndWeights(commit | roll back)──▶ every rank
    begin_weight_transfer, weight_chunk × n, end_weight_transfer      (tensors from a client)
                                          core ──BeginWeights, WeightPieces × n, EndWeights──▶ ranks

Tensors travel as raw uint8 side frames (`TensorPiece.data`, a numpy array), never pickled.
"""

from typing import Any, Literal, Optional

import msgspec

# The dtypes a tensor may arrive in; it is cast to its parameter's dtype (all floating).
DTYPE_SIZES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
DEFAULT_BUCKET_BYTES = 64 * 2**20
DEFAULT_GROUP_NAME = "weight_update_group"
# The group vLLM's routes use: vLLM has one weight-transfer engine per server, its group unnamed.
VLLM_GROUP_NAME = "vllm_weight_transfer"
VLLM_BUCKET_BYTES = 2**30  # vLLM's packed_buffer_size_bytes default
KvMode = Literal["keep", "recompute"]
SleepTag = Literal["weights", "kv_cache"]
# How a weight group is made and packed, after whose trainers join it (see worker/weight_group.py).
GroupStyle = Literal["sglang", "vllm"]


def dtype_name(name: str) -> str:
    """`"bfloat16"` for `"bfloat16"` or `"torch.bfloat16"`; ValueError for a dtype not accepted."""
    short = name.removeprefix("torch.")
    if short not in DTYPE_SIZES:
        raise ValueError(f"dtype {name!r} is not accepted (one of {', '.join(DTYPE_SIZES)})")
    return short


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    """A whole tensor as the sender has it: its HF parameter name, dtype and (unsharded) shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_SIZES[self.dtype]


def tensor_specs(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[TensorSpec]:
    """The specs of parallel lists (SGLang's and vLLM's form); ValueError naming what is wrong."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if any(size < 0 for size in shape):
            raise ValueError(f"tensor {name!r}: negative size in shape {list(shape)}")
        try:
            specs.append(TensorSpec(name, dtype_name(dtype), tuple(shape)))
        except ValueError as error:
            raise ValueError(f"tensor {name!r}: {error}") from None
    return specs


class TensorPiece(msgspec.Struct, array_like=True):
    """Bytes `[offset, offset + len(data))` of tensor `name` in its spec's dtype, C order."""

    name: str
    offset: int
    data: Any  # a numpy uint8 array, sent as a side frame


class BucketPiece(msgspec.Struct, array_like=True, frozen=True):
    """Bytes `[tensor_offset, tensor_offset + length)` of tensor `index` sit at `bucket_offset`."""

    index: int
    tensor_offset: int
    bucket_offset: int
    length: int


def bucket_layout(specs: list[TensorSpec], bucket_bytes: int) -> list[list[BucketPiece]]:
    """Packed buckets: the tensors' bytes concatenated in order and cut every `bucket_bytes`, so
    each bucket is at most that size (a tensor may span buckets). Sender and receiver both
    compute it from the specs alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[BucketPiece]] = []
    used = bucket_bytes  # the current bucket is full: the first byte opens one
    for index, spec in enumerate(specs):
        done = 0
        while done < spec.nbytes:
            if used == bucket_bytes:
                buckets.append([])
                used = 0
            length = min(spec.nbytes - done, bucket_bytes - used)
            buckets[-1].append(BucketPiece(index, done, used, length))
            done += length
            used += length
    return buckets


def whole_tensor_layout(specs: list[TensorSpec], bucket_bytes: int) -> list[list[BucketPiece]]:
    """vLLM's packed buckets: whole tensors concatenated in order, a bucket closed once its bytes
    exceed `bucket_bytes` (the tensor that crosses it included), or at the end."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[BucketPiece]] = [[]]
    used = 0
    for index, spec in enumerate(specs):
        if used > bucket_bytes:
            buckets.append([])
            used = 0
        if spec.nbytes:  # a tensor without bytes takes no room, as in bucket_layout
            buckets[-1].append(BucketPiece(index, 0, used, spec.nbytes))
            used += spec.nbytes
    return [bucket for bucket in buckets if bucket]


def packed_layout(style: "GroupStyle", specs: list[TensorSpec], bucket_bytes: int) -> list[list[BucketPiece]]:
    return (whole_tensor_layout if style == "vllm" else bucket_layout)(specs, bucket_bytes)


def bucket_sizes(layout: list[list[BucketPiece]]) -> list[int]:
    return [bucket[-1].bucket_offset + bucket[-1].length for bucket in layout]


# ---- utility call arguments and results ---------------------------------------------------


class UpdateWeightsArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`update_weights`: one of `path` (a safetensors file or folder) or `group` (a weight group,
    broadcasting `names` in order; none: the names of the group's last update); a client transfer
    (`begin_weight_transfer`) takes neither. `packed` and `bucket_bytes` None: the group's own.
    `kv` is for `atomic` updates, which resume by themselves."""

    path: Optional[str] = None
    group: Optional[str] = None
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    packed: Optional[bool] = None
    bucket_bytes: Optional[int] = None
    version: Optional[str] = None
    atomic: bool = False
    kv: Optional[KvMode] = None


class TransferArgs(msgspec.Struct, forbid_unknown_fields=True):
    transfer_id: int
    commit: bool = True


class WeightUpdateResult(msgspec.Struct):
    weight_version: str
    num_tensors: int
    seconds: float


class InitWeightGroupArgs(msgspec.Struct, forbid_unknown_fields=True):
    """The trainer is rank 0 and hosts the rendezvous; worker rank r joins as `rank_offset + r`.
    `backend` None means gloo on CPU, NCCL on CUDA (a vLLM-style group: gloo). `packed` and
    `bucket_bytes` are what updates through the group use unless they say otherwise."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: Optional[str] = None
    timeout_s: float = 300.0
    style: GroupStyle = "sglang"
    packed: bool = False
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class GroupNameArgs(msgspec.Struct, forbid_unknown_fields=True):
    group_name: str = DEFAULT_GROUP_NAME


class VersionArgs(msgspec.Struct, forbid_unknown_fields=True):
    version: str


class ResumeArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`kv="recompute"` prefills each frozen request's tokens again (after a weight update)."""

    kv: KvMode = "keep"


class SleepArgs(msgspec.Struct, forbid_unknown_fields=True):
    """Level 1 frees the KV cache; level 2 also takes the weights off the device."""

    level: Literal[1, 2] = 1


class WakeUpArgs(msgspec.Struct, forbid_unknown_fields=True):
    """None wakes everything."""

    tags: Optional[list[SleepTag]] = None


# ---- core -> every worker rank ------------------------------------------------------------


class BeginWeights(msgspec.Struct, tag="begin_weights", array_like=True):
    """Check the update against the model (nothing written on a failure); for a path or a group,
    then load it all. The old values are kept until `EndWeights`. Its `op_id` names the update."""

    op_id: int
    path: Optional[str] = None
    group: Optional[str] = None
    tensors: list[TensorSpec] = []
    packed: bool = False
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class WeightPieces(msgspec.Struct, tag="weight_pieces", array_like=True):
    op_id: int
    update_id: int
    pieces: list[TensorPiece] = []


class EndWeights(msgspec.Struct, tag="end_weights", array_like=True):
    """Keep what update `update_id` wrote (`commit`), or put the old values back."""

    op_id: int
    update_id: int
    commit: bool


class InitWeightGroup(msgspec.Struct, tag="init_group", array_like=True):
    op_id: int
    args: InitWeightGroupArgs


class DestroyWeightGroup(msgspec.Struct, tag="destroy_group", array_like=True):
    op_id: int
    group_name: str


class Sleep(msgspec.Struct, tag="sleep", array_like=True):
    op_id: int
    level: int


class WakeUp(msgspec.Struct, tag="wake_up", array_like=True):
    op_id: int
    tags: list[SleepTag]


class WorkerReply(msgspec.Struct, tag="worker_reply", array_like=True):
    """Every rank's answer to a command. `restored` False: a roll back could not put the old
    values back (they were not kept)."""

    op_id: int
    rank: int
    error: Optional[str] = None
    num_tensors: int = 0
    restored: bool = True


WorkerCommand = BeginWeights | WeightPieces | EndWeights | InitWeightGroup | DestroyWeightGroup | Sleep | WakeUp
