"""Moving new weights into a running engine: the trainer's side of a weight group, and the chunks a
client sends its tensors in.

A trainer process (rank 0) creates the group and broadcasts; the engine joins it through
`init_weight_group` at the same time, and receives through `update_weights(group=...)`:

    group = TrainerWeightGroup.create("127.0.0.1", port, world_size=1 + num_workers)
    ...                                      # meanwhile: await client.init_weight_group(...)
    await sync_weights(client, group, model.state_dict(), packed=True)

The group is made the way SGLang's engine and its trainers (slime, AReaL) make one, so either
side also works with theirs: rendezvous at `tcp://address:port` hosted by rank 0, the store
prefixed by the group's name, group ranks as global ranks. torch is needed here only.
"""

import asyncio
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

from protocol.weights import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_GROUP_NAME,
    TensorPiece,
    bucket_layout,
    bucket_sizes,
    tensor_specs,
)

if TYPE_CHECKING:
    from frontend.client import AsyncClient
    from protocol.weights import WeightUpdateResult

StateDict = Mapping[str, torch.Tensor]


def distinct_tensors(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """The state dict without the tensors that are one before them (a tied head is the
    embedding: the engine writes both through either name), so no bytes are sent twice."""
    seen: set[tuple] = set()
    distinct = {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage()
        place = (tensor.device, storage.data_ptr(), tensor.storage_offset(), tensor.shape, tensor.dtype)
        if tensor.numel() and place in seen:
            continue
        seen.add(place)
        distinct[name] = tensor
    return distinct


def state_dict_specs(state_dict: StateDict) -> tuple[list[str], list[str], list[list[int]]]:
    """`names, dtypes, shapes` of a state dict, in its order (what `update_weights` declares)."""
    names = list(state_dict)
    dtypes = [str(t.dtype).removeprefix("torch.") for t in state_dict.values()]
    shapes = [list(t.shape) for t in state_dict.values()]
    return names, dtypes, shapes


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in C order as a flat uint8 tensor on its device (a view when contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_chunks(state_dict: StateDict, chunk_bytes: int) -> Iterator[list[TensorPiece]]:
    """The tensors' bytes in order, cut into chunks of at most `chunk_bytes` (a tensor may span
    chunks). Each chunk's pieces are views of the tensors, made one chunk at a time."""
    chunk: list[TensorPiece] = []
    room = chunk_bytes
    for name, tensor in state_dict.items():
        data = flat_bytes(tensor).cpu().numpy()
        done = 0
        while done < len(data):
            length = min(len(data) - done, room)
            chunk.append(TensorPiece(name, done, data[done : done + length]))
            done += length
            room -= length
            if room == 0:
                yield chunk
                chunk, room = [], chunk_bytes
    if chunk:
        yield chunk


class TrainerWeightGroup:
    """Rank 0 of a weight group, hosting its rendezvous; the engine's ranks join it."""

    def __init__(self, group: dist.ProcessGroup, name: str, device: torch.device) -> None:
        self.group = group
        self.name = name
        self.device = device
        self._buffer: torch.Tensor | None = None  # buckets are packed here, send after send

    @classmethod
    def create(
        cls,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str = DEFAULT_GROUP_NAME,
        backend: str = "gloo",
        timeout_s: float = 300.0,
    ) -> "TrainerWeightGroup":
        """Host the group and wait until every engine rank joined (call `init_weight_group` meanwhile)."""
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout)
        group, _ = _new_process_group_helper(
            world_size, 0, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, timeout=timeout
        )
        _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        return cls(group, group_name, device)

    def send(self, state_dict: StateDict, packed: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Broadcast every tensor in order, or packed into uint8 buckets of at most `bucket_bytes`."""
        if not packed:
            for tensor in state_dict.values():
                dist.broadcast(tensor.detach().contiguous().to(self.device), src=0, group=self.group)
            return
        tensors = [flat_bytes(t) for t in state_dict.values()]
        layout = bucket_layout(tensor_specs(*state_dict_specs(state_dict)), bucket_bytes)
        sizes = bucket_sizes(layout)
        if self._buffer is None or self._buffer.numel() < max(sizes, default=0):
            # Kept: packing into memory written before is several times faster than into fresh pages.
            self._buffer = torch.empty(max(sizes), dtype=torch.uint8, device=self.device)
        for pieces, size in zip(layout, sizes):
            bucket = self._buffer[:size]
            for piece in pieces:
                data = tensors[piece.index][piece.tensor_offset : piece.tensor_offset + piece.length]
                bucket[piece.bucket_offset : piece.bucket_offset + piece.length].copy_(data)
            dist.broadcast(bucket, src=0, group=self.group)

    def destroy(self) -> None:
        dist.destroy_process_group(self.group)


async def sync_weights(
    client: "AsyncClient",
    group: TrainerWeightGroup,
    state_dict: StateDict,
    packed: bool = False,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    **update: object,
) -> "WeightUpdateResult":
    """Push `state_dict` into the engine: its `update_weights(group=...)` and the broadcasts run
    together. `update` takes `version`, `atomic` and `kv`. Without `atomic` the engine must be
    paused; that is checked first, so that no broadcast waits for an engine that refused."""
    if not update.get("atomic") and (await client.get_state()).state != "paused":
        raise RuntimeError("the engine is not paused: pause it first, or pass atomic=True")
    state_dict = distinct_tensors(state_dict)
    names, dtypes, shapes = state_dict_specs(state_dict)
    engine_side = client.update_weights(group=group.name, names=names, dtypes=dtypes, shapes=shapes,
                                        packed=packed, bucket_bytes=bucket_bytes, **update)  # fmt: skip
    # A bad name or shape fails on the engine's side only after its ranks drained the broadcasts.
    result, _ = await asyncio.gather(engine_side, asyncio.to_thread(group.send, state_dict, packed, bucket_bytes))
    return result
