"""Weight groups: a torch.distributed group that a trainer (rank 0) made and every worker rank joins,
so that the trainer can broadcast new weights to all of them.

A group is joined the way SGLang's engine joins one, so that trainers written for SGLang (slime,
AReaL) connect unchanged: rendezvous at `tcp://master_address:master_port` (the trainer hosts the
store), the store prefixed by the group's name, and group ranks used as global ranks (the
trainer broadcasts from rank 0). `frontend.weight_sync` is the trainer's side.

Tensors come one broadcast each, in the update's order, or packed: uint8 buckets laid out by
`protocol.weights.bucket_layout`, which the trainer computes the same way.
"""

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

from protocol.weights import InitWeightGroupArgs, TensorSpec, bucket_layout, bucket_sizes
from worker.kv_cache import torch_dtype
from worker.weights import PieceAssembler, Target, WeightError, WeightUpdate

logger = logging.getLogger(__name__)


def join_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> dist.ProcessGroup:
    """Join (or, as rank 0, host) weight group `group_name`; returns once every rank joined."""
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class WeightGroups:
    """This rank's weight groups by name."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.groups: dict[str, tuple[dist.ProcessGroup, torch.device]] = {}
        self._buffer: torch.Tensor | None = None  # packed buckets land here

    def join(self, args: InitWeightGroupArgs) -> None:
        if args.group_name in self.groups:
            raise WeightError(f"weight group {args.group_name!r} exists: destroy_weight_group first")
        backend = args.backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if "nccl" in backend and self.device.type != "cuda":
            raise WeightError(f"backend {backend!r} needs CUDA; this engine runs on {self.device.type}: use gloo")
        rank = args.rank_offset + self.rank
        if not 0 < rank < args.world_size:
            raise WeightError(f"rank {rank} (rank_offset {args.rank_offset}) is outside world_size {args.world_size}")
        logger.info("joining weight group %r at %s:%d as rank %d of %d (%s)", args.group_name,
                    args.master_address, args.master_port, rank, args.world_size, backend)  # fmt: skip
        group = join_group(args.master_address, args.master_port, rank, args.world_size,
                           args.group_name, backend, args.timeout_s)  # fmt: skip
        # NCCL receives on the GPU; gloo into host memory.
        self.groups[args.group_name] = (group, self.device if backend == "nccl" else torch.device("cpu"))

    def destroy(self, name: str) -> None:
        group, _ = self._get(name)
        del self.groups[name]
        dist.destroy_process_group(group)

    def receive(self, name: str, targets: list[Target], update: WeightUpdate) -> None:
        """One broadcast from rank 0 per target, in order. A whole parameter of the sent dtype
        receives in place (its old value saved first); others through a buffer."""
        group, device = self._get(name)
        for index, target in enumerate(targets):
            what = f"tensor {index + 1} of {len(targets)} ({target.spec.name!r})"
            dtype = torch_dtype(target.spec.dtype)
            local = target.local
            if target.index is None and local.dtype == dtype and local.device == device and local.is_contiguous():
                update.save(target)
                _broadcast(local.data, group, what)
                continue
            value = torch.empty(target.spec.shape, dtype=dtype, device=device)
            _broadcast(value, group, what)
            update.write(target, target.part_of(value))

    def receive_packed(self, name: str, targets: list[Target], bucket_bytes: int, assembler: PieceAssembler) -> None:
        """One uint8 broadcast per bucket, into one buffer kept for the next update; its pieces
        go to `assembler`."""
        group, device = self._get(name)
        layout = bucket_layout([t.spec for t in targets], bucket_bytes)
        sizes = bucket_sizes(layout)
        buffer = self._bucket_buffer(max(sizes, default=0), device)
        for index, (pieces, size) in enumerate(zip(layout, sizes)):
            bucket = buffer[:size]
            _broadcast(bucket, group, f"bucket {index + 1} of {len(layout)}")
            for piece in pieces:
                data = bucket[piece.bucket_offset : piece.bucket_offset + piece.length]
                assembler.add(targets[piece.index].spec.name, piece.tensor_offset, data)

    def drain(self, name: str, specs: list[TensorSpec], packed: bool, bucket_bytes: int) -> None:
        """Receive an update's broadcasts and drop them (it was refused), so the trainer's send
        ends instead of waiting for this rank."""
        group, device = self._get(name)
        if packed:
            shapes = [((n,), torch.uint8) for n in bucket_sizes(bucket_layout(specs, bucket_bytes))]
        else:
            shapes = [(s.shape, torch_dtype(s.dtype)) for s in specs]
        for shape, dtype in shapes:
            dist.broadcast(torch.empty(shape, dtype=dtype, device=device), src=0, group=group)

    def _bucket_buffer(self, size: int, device: torch.device) -> torch.Tensor:
        """Memory written before is several times faster to receive into than fresh pages."""
        if self._buffer is None or self._buffer.numel() < size or self._buffer.device != device:
            self._buffer = torch.empty(size, dtype=torch.uint8, device=device)
        return self._buffer

    def _get(self, name: str) -> tuple[dist.ProcessGroup, torch.device]:
        entry = self.groups.get(name)
        if entry is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise WeightError(f"no weight group {name!r} (joined: {known}): init_weight_group first")
        return entry


def _broadcast(tensor: torch.Tensor, group: dist.ProcessGroup, what: str) -> None:
    """Receive one broadcast from rank 0; a lost trainer is a WeightError saying which one broke."""
    try:
        dist.broadcast(tensor, src=0, group=group)
    except (RuntimeError, dist.DistError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason.split("] ", 1)[-1].split(". ")[0]  # gloo prefixes its source location
        raise WeightError(f"the broadcast broke at {what}: {reason} (did the trainer die?)") from error
