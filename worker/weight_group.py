"""Weight groups: a torch.distributed group that a trainer (rank 0) made and every worker rank joins,
so that the trainer can broadcast new weights to all of them.

A group is joined the way the trainer's own engine would join it, so that trainers connect
unchanged. Both styles rendezvous at `tcp://master_address:master_port` (the trainer hosts the
store) and take broadcasts from rank 0:
* "sglang" (slime, AReaL; `frontend.weight_sync` is our trainer's side): the store prefixed by
  the group's name, `_new_process_group_helper`, group ranks used as global ranks. Packed buckets
  are the tensors' bytes cut every `bucket_bytes` (`protocol.weights.bucket_layout`).
* "vllm" (vLLM's weight transfer over torch.distributed, `TorchDistTransport`): the store prefixed
  by the rendezvous address, a bare gloo group outside torch's registry, and a barrier after each
  broadcast. Packed buckets hold whole tensors (`protocol.weights.whole_tensor_layout`).

Tensors come one broadcast each, in the update's order, or packed into uint8 buckets.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    ProcessGroupGloo,
    _new_process_group_helper,
    _world,
    rendezvous,
)

from protocol.weights import GroupStyle, InitWeightGroupArgs, TensorSpec, bucket_sizes, packed_layout
from worker.kv_cache import torch_dtype
from worker.weights import PieceAssembler, Target, WeightError, WeightUpdate

logger = logging.getLogger(__name__)


def join_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> dist.ProcessGroup:
    """Join (or, as rank 0, host) SGLang-style weight group `group_name`; returns once every rank joined."""
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def join_vllm_group(
    master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float
) -> dist.ProcessGroup:
    """Join a vLLM-style weight group (gloo); returns once every rank joined."""
    timeout = timedelta(seconds=timeout_s)
    address = f"tcp://{master_address}:{master_port}"
    store, _, _ = next(rendezvous(address, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefixed = PrefixStore(address, store)
    group = dist.ProcessGroup(prefixed, rank, world_size)
    gloo = ProcessGroupGloo(prefixed, rank, world_size, timeout=timeout)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    gloo._set_sequence_number_for_group()
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    return group


@dataclass
class Membership:
    group: dist.ProcessGroup
    device: torch.device  # where broadcasts land
    style: GroupStyle


class WeightGroups:
    """This rank's weight groups by name."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.groups: dict[str, Membership] = {}
        self._buffer: torch.Tensor | None = None  # packed buckets land here

    def join(self, args: InitWeightGroupArgs) -> None:
        if args.group_name in self.groups:
            raise WeightError(f"weight group {args.group_name!r} exists: destroy_weight_group first")
        backend = args.backend or ("nccl" if self.device.type == "cuda" and args.style == "sglang" else "gloo")
        if "nccl" in backend and self.device.type != "cuda":
            raise WeightError(f"backend {backend!r} needs CUDA; this engine runs on {self.device.type}: use gloo")
        if args.style == "vllm" and backend != "gloo":
            # vLLM's NCCL transfer runs PyNccl over its own store protocol, not torch.distributed.
            raise WeightError(f"a vLLM-style weight group is gloo (torch.distributed) only, not {backend!r}")
        rank = args.rank_offset + self.rank
        if not 0 < rank < args.world_size:
            raise WeightError(f"rank {rank} (rank_offset {args.rank_offset}) is outside world_size {args.world_size}")
        logger.info("joining weight group %r at %s:%d as rank %d of %d (%s)", args.group_name,
                    args.master_address, args.master_port, rank, args.world_size, backend)  # fmt: skip
        if args.style == "vllm":
            group = join_vllm_group(args.master_address, args.master_port, rank, args.world_size, args.timeout_s)
        else:
            group = join_group(args.master_address, args.master_port, rank, args.world_size,
                               args.group_name, backend, args.timeout_s)  # fmt: skip
        # NCCL receives on the GPU; gloo into host memory.
        device = self.device if backend == "nccl" else torch.device("cpu")
        self.groups[args.group_name] = Membership(group, device, args.style)

    def destroy(self, name: str) -> None:
        member = self._get(name)
        del self.groups[name]
        if member.style == "vllm":  # never in torch's registry
            member.group.shutdown()
        else:
            dist.destroy_process_group(member.group)

    def receive(self, name: str, targets: list[Target], update: WeightUpdate) -> None:
        """One broadcast from rank 0 per target, in order. A whole parameter of the sent dtype
        receives in place (its old value saved first); others through a buffer."""
        member = self._get(name)
        for index, target in enumerate(targets):
            what = f"tensor {index + 1} of {len(targets)} ({target.spec.name!r})"
            dtype = torch_dtype(target.spec.dtype)
            local = target.local
            whole = target.index is None and local.dtype == dtype and local.is_contiguous()
            if whole and local.device == member.device:
                update.save(target)
                _broadcast(local.data, member, what)
                continue
            value = torch.empty(target.spec.shape, dtype=dtype, device=member.device)
            _broadcast(value, member, what)
            update.write(target, target.part_of(value))

    def receive_packed(self, name: str, targets: list[Target], bucket_bytes: int, assembler: PieceAssembler) -> None:
        """One uint8 broadcast per bucket, into one buffer kept for the next update; its pieces
        go to `assembler`."""
        member = self._get(name)
        layout = packed_layout(member.style, [t.spec for t in targets], bucket_bytes)
        sizes = bucket_sizes(layout)
        buffer = self._bucket_buffer(max(sizes, default=0), member.device)
        for index, (pieces, size) in enumerate(zip(layout, sizes)):
            bucket = buffer[:size]
            _broadcast(bucket, member, f"bucket {index + 1} of {len(layout)}")
            for piece in pieces:
                data = bucket[piece.bucket_offset : piece.bucket_offset + piece.length]
                assembler.add(targets[piece.index].spec.name, piece.tensor_offset, data)

    def drain(self, name: str, specs: list[TensorSpec], packed: bool, bucket_bytes: int) -> None:
        """Receive an update's broadcasts and drop them (it was refused), so the trainer's send
        ends instead of waiting for this rank."""
        member = self._get(name)
        if packed:
            shapes = [((n,), torch.uint8) for n in bucket_sizes(packed_layout(member.style, specs, bucket_bytes))]
        else:
            shapes = [(s.shape, torch_dtype(s.dtype)) for s in specs]
        for index, (shape, dtype) in enumerate(shapes):
            drained = torch.empty(shape, dtype=dtype, device=member.device)
            _broadcast(drained, member, f"broadcast {index + 1} (drained)")

    def _bucket_buffer(self, size: int, device: torch.device) -> torch.Tensor:
        """Memory written before is several times faster to receive into than fresh pages."""
        if self._buffer is None or self._buffer.numel() < size or self._buffer.device != device:
            self._buffer = torch.empty(size, dtype=torch.uint8, device=device)
        return self._buffer

    def _get(self, name: str) -> Membership:
        entry = self.groups.get(name)
        if entry is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise WeightError(f"no weight group {name!r} (joined: {known}): init_weight_group first")
        return entry


def _broadcast(tensor: torch.Tensor, member: Membership, what: str) -> None:
    """Receive one broadcast from rank 0; a lost trainer is a WeightError saying which one broke."""
    try:
        if member.style == "vllm":
            dist.broadcast(tensor, group_src=0, group=member.group)
            dist.barrier(group=member.group)
        else:
            dist.broadcast(tensor, src=0, group=member.group)
    except (RuntimeError, dist.DistError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason.split("] ", 1)[-1].split(". ")[0]  # gloo prefixes its source location
        raise WeightError(f"the broadcast broke at {what}: {reason} (did the trainer die?)") from error
