"""Writing new weights into the model's parameters: checked first, old values kept until commit.

Names are the model's HF parameter names, tied aliases included (`lm_head.weight` of a model
whose head is tied to `model.embed_tokens.weight` is the same tensor). A tensor arrives whole (its
unsharded shape); under tensor parallelism each rank copies out its own shard. A floating tensor
of another floating dtype is cast to its parameter's dtype, as `from_pretrained(dtype=...)` does.

    update = weights.begin(specs)      # every name, shape and dtype checked: WeightError, nothing written
    update.write(target, part) ...     # each parameter's old value is saved before its first write
    update.commit() | update.roll_back()   # roll_back says whether the old values are back

The fused projections of the native forward are views of the same memory, so they see every write.
The old values go to host buffers that the next update reuses: writing into memory already
touched is several times faster than into fresh pages.
"""

import difflib
import logging
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from protocol.weights import TensorSpec
from worker.kv_cache import free_memory_bytes, torch_dtype

logger = logging.getLogger(__name__)

# The old values are kept only where they leave this share of the host's free memory.
MAX_SAVED_SHARE = 0.8


class WeightError(ValueError):
    """A tensor does not fit the model; the message names it."""


@dataclass(frozen=True)
class Target:
    """Where one arriving tensor goes: `local` (this rank's tensor), at `index` of the whole
    tensor (None: all of it). Tied aliases share `key`."""

    spec: TensorSpec
    key: str
    local: torch.Tensor
    index: tuple[slice, ...] | None

    def part_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor."""
        return whole if self.index is None else whole[self.index]


def as_tensor(data: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor of `spec` whose bytes are the uint8 `data`."""
    if data.storage_offset() % torch_dtype(spec.dtype).itemsize:
        data = data.clone()  # a dtype view needs an aligned start
    return data.view(torch_dtype(spec.dtype)).view(spec.shape)


class ModelWeights:
    def __init__(self, model: torch.nn.Module) -> None:
        self.params: dict[str, torch.nn.Parameter] = {}
        self.keys: dict[str, str] = {}  # name -> the first name of the same parameter
        self.backups: dict[str, torch.Tensor] = {}  # key -> host buffer for its old value
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self.params[name] = param
            self.keys[name] = first_name.setdefault(id(param), name)

    def targets(self, specs: list[TensorSpec]) -> list[Target]:
        """Each spec checked against the model; WeightError naming the first that does not fit."""
        seen: set[str] = set()
        targets = []
        for spec in specs:
            if spec.name in seen:
                raise WeightError(f"tensor {spec.name!r} appears twice")
            seen.add(spec.name)
            targets.append(self._target(spec))
        return targets

    def _target(self, spec: TensorSpec) -> Target:
        param = self.params.get(spec.name)
        if param is None:
            close = difflib.get_close_matches(spec.name, self.params, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise WeightError(f"{spec.name!r} is not a parameter of this model{hint}")
        if tuple(param.shape) != spec.shape:
            raise WeightError(f"tensor {spec.name!r} has shape {list(spec.shape)}, the model's is {list(param.shape)}")
        if not param.is_floating_point():
            raise WeightError(f"parameter {spec.name!r} is {param.dtype}, not floating: it cannot be updated")
        local, index = _local_shard(param)
        return Target(spec, self.keys[spec.name], local, index)

    def begin(self, targets: list[Target], disposable: frozenset[str] = frozenset()) -> "WeightUpdate":
        """`disposable`: keys whose old values need not be kept (sleep dropped them)."""
        targets = [t for t in targets if t.key not in disposable]
        new_bytes = sum({t.key: t.local.nbytes for t in targets if t.key not in self.backups}.values())
        keep_old = new_bytes <= MAX_SAVED_SHARE * free_memory_bytes(torch.device("cpu"))
        if not keep_old:
            logger.warning(
                "no room to keep the old weights (%.0f MiB more): a failure part-way leaves them unusable",
                new_bytes / 2**20,
            )
        return WeightUpdate(self.backups if keep_old else None, disposable)

    def release_backups(self) -> None:
        self.backups = {}


def _local_shard(param: torch.nn.Parameter) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
    """This rank's tensor of `param` and its place in the whole one (None when it is all of it)."""
    if not isinstance(param, DTensor):
        return param, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(shape) == tuple(param.shape):
        return local, None
    return local, tuple(slice(start, start + size) for start, size in zip(offset, shape))


@dataclass
class WeightUpdate:
    """One update's writes. With `backups` (host buffers by key), each parameter's old value is
    saved before its first write, so a roll back can put it back."""

    backups: dict[str, torch.Tensor] | None
    disposable: frozenset[str] = frozenset()  # keys whose old values are not kept
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> its local tensor, saved
    written: set[str] = field(default_factory=set)

    @torch.no_grad()
    def save(self, target: Target) -> None:
        """Keep `target`'s old value, before something writes it (here or in place)."""
        if self.backups is not None and target.key not in self.saved and target.key not in self.disposable:
            backup = self.backups.get(target.key)
            if backup is None or backup.shape != target.local.shape or backup.dtype != target.local.dtype:
                backup = self.backups[target.key] = torch.empty_like(target.local, device="cpu")
            backup.copy_(target.local)
            self.saved[target.key] = target.local
        self.written.add(target.key)

    @torch.no_grad()
    def write(self, target: Target, part: torch.Tensor) -> None:
        """`part` is this rank's part of the tensor (`target.part_of(whole)`; any device and dtype)."""
        self.save(target)
        target.local.copy_(part)

    def commit(self) -> None:
        self.saved.clear()

    @torch.no_grad()
    def roll_back(self) -> bool:
        """Put the old values back; False when some were written and not kept."""
        if self.backups is None and self.written - self.disposable:
            return False
        for key, local in self.saved.items():
            local.copy_(self.backups[key])
        self.saved.clear()
        return True


class PieceAssembler:
    """Tensors that arrive as byte ranges (client chunks, packed buckets). The bytes of a whole
    parameter of the sent dtype go straight into it (its old value saved first); any other
    tensor is written once all its bytes are there."""

    def __init__(self, update: WeightUpdate, targets: list[Target]) -> None:
        self._update = update
        self._targets = {t.spec.name: t for t in targets}
        self._partial: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}

    def add(self, name: str, offset: int, data: torch.Tensor) -> None:
        """`data`: uint8 bytes `[offset, offset + len(data))` of tensor `name`."""
        target = self._targets.get(name)
        if target is None:
            raise WeightError(f"tensor {name!r} is not in this update")
        nbytes = target.spec.nbytes
        if offset < 0 or offset + len(data) > nbytes:
            raise WeightError(f"bytes {offset}..{offset + len(data)} of tensor {name!r} are past its {nbytes}")
        local = target.local
        if target.index is None and local.dtype == torch_dtype(target.spec.dtype) and local.is_contiguous():
            self._update.save(target)
            local.detach().view(-1).view(torch.uint8)[offset : offset + len(data)].copy_(data)
            return
        if offset == 0 and len(data) == nbytes:
            self._update.write(target, target.part_of(as_tensor(data, target.spec)))
            return
        buffer = self._partial.setdefault(name, torch.empty(nbytes, dtype=torch.uint8))
        buffer[offset : offset + len(data)].copy_(data)
        self._filled[name] = self._filled.get(name, 0) + len(data)
        if self._filled[name] == nbytes:
            self._update.write(target, target.part_of(as_tensor(self._partial.pop(name), target.spec)))
            del self._filled[name]
