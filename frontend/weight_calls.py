"""The client's weight calls: updates (from a path, from tensors, from a trainer's group), weight
groups, versions, the prefix cache and sleep. `AsyncClient` and `Client` take them from here.

    await client.pause(mode="keep")
    await client.update_weights(path="/ckpt/step-7")            # or tensors={name: tensor}, or group=...
    await client.resume(kv="recompute")
    await client.update_weights(tensors=state_dict, atomic=True, version="step-8")   # all in one call
"""

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import msgspec

from protocol.errors import InvalidRequestError
from protocol.messages import ClientCall, EngineState
from protocol.codec import encode_args
from protocol.weights import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_GROUP_NAME,
    GroupNameArgs,
    GroupStyle,
    InitWeightGroupArgs,
    SleepArgs,
    TransferArgs,
    UpdateWeightsArgs,
    VersionArgs,
    WakeUpArgs,
    WeightUpdateResult,
)

if TYPE_CHECKING:
    import torch

WEIGHTS_TIMEOUT_S = 600.0  # a group update waits for the trainer's broadcasts
DEFAULT_CHUNK_BYTES = 32 * 2**20
# Chunks of chunk_bytes / CHUNKS_IN_FLIGHT are sent, that many at a time: while the core passes
# one on, the frontend already receives the next, and no process holds more than chunk_bytes.
CHUNKS_IN_FLIGHT = 2


class WeightCalls:
    """Mixed into `AsyncClient`: they use its `call`, `_send` and `_ids`."""

    async def update_weights(
        self,
        path: Optional[str] = None,
        tensors: Optional[Mapping[str, "torch.Tensor"]] = None,
        group: Optional[str] = None,
        *,
        names: Sequence[str] = (),
        dtypes: Sequence[str] = (),
        shapes: Sequence[Sequence[int]] = (),
        packed: Optional[bool] = None,
        bucket_bytes: Optional[int] = None,
        version: Optional[str] = None,
        atomic: bool = False,
        kv: Optional[str] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float = WEIGHTS_TIMEOUT_S,
    ) -> WeightUpdateResult:
        """New weights from one of: `path` (a safetensors file or HF folder, all tensors or some),
        `tensors` ({HF name: tensor}, sent in chunks, at most `chunk_bytes` in flight), or `group` (a
        trainer broadcasts `names` with `dtypes` and `shapes` in that order, or `packed` into
        uint8 buckets of `bucket_bytes`; none of them: the group's last names, None: the group's
        packing, from `init_weight_group`). Needs a paused engine, or `atomic=True`:
        pause(keep), load, resume(kv) as one call. Returns once every worker loaded; a failure
        leaves the old weights (UtilityError says so)."""
        if sum(source is not None for source in (path, tensors, group)) != 1:
            raise InvalidRequestError("give exactly one of path, tensors or group")
        if chunk_bytes < 1:
            raise InvalidRequestError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        args = UpdateWeightsArgs(path=path, group=group, names=list(names), dtypes=list(dtypes),
                                 shapes=[list(s) for s in shapes], packed=packed, bucket_bytes=bucket_bytes,
                                 version=version, atomic=atomic, kv=kv)  # fmt: skip
        if tensors is None:
            value = await self.call("update_weights", args, timeout)
        else:
            value = await self._transfer(tensors, args, chunk_bytes, timeout)
        return msgspec.convert(value, WeightUpdateResult)

    async def _transfer(
        self, tensors: Mapping[str, "torch.Tensor"], args: UpdateWeightsArgs, chunk_bytes: int, timeout: float
    ) -> Any:
        """Declare the tensors, send them in chunks (CHUNKS_IN_FLIGHT unanswered at most), commit."""
        # Imported here: torch is needed for tensors only, not by every client.
        from frontend.weight_sync import distinct_tensors, state_dict_specs, tensor_chunks

        tensors = distinct_tensors(tensors)
        names, dtypes, shapes = state_dict_specs(tensors)
        args = msgspec.structs.replace(args, names=names, dtypes=dtypes, shapes=shapes)
        transfer = TransferArgs((await self.call("begin_weight_transfer", args, timeout))["transfer_id"])
        in_flight: deque[asyncio.Future] = deque()
        try:
            for pieces in tensor_chunks(tensors, max(1, chunk_bytes // CHUNKS_IN_FLIGHT)):
                if len(in_flight) == CHUNKS_IN_FLIGHT:
                    await in_flight.popleft()
                in_flight.append(asyncio.ensure_future(self.call("weight_chunk", transfer, timeout, tensors=pieces)))
            while in_flight:
                await in_flight.popleft()
        except BaseException:
            for chunk in in_flight:
                chunk.cancel()
            # Not awaited (this task may be cancelled): the engine rolls the transfer back.
            cancel = TransferArgs(transfer.transfer_id, commit=False)
            self._send(ClientCall(next(self._ids), "end_weight_transfer", encode_args(cancel)))
            raise
        return await self.call("end_weight_transfer", transfer, timeout)

    async def init_weight_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = DEFAULT_GROUP_NAME,
        backend: Optional[str] = None,
        timeout_s: float = 300.0,
        style: GroupStyle = "sglang",
        packed: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> EngineState:
        """Every worker rank joins the trainer's group (the trainer, rank 0, joins meanwhile);
        returns once all joined. `backend` None: gloo on CPU, NCCL on CUDA. `style` is whose
        trainers make the group ("sglang": slime, AReaL; "vllm": vLLM's weight transfer over
        torch.distributed); `packed` and `bucket_bytes` are how its updates pack by default."""
        args = InitWeightGroupArgs(master_address, master_port, rank_offset, world_size, group_name, backend,
                                   timeout_s, style, packed, bucket_bytes)  # fmt: skip
        return msgspec.convert(await self.call("init_weight_group", args, timeout_s + 30.0), EngineState)

    async def destroy_weight_group(self, group_name: str = DEFAULT_GROUP_NAME) -> EngineState:
        return msgspec.convert(await self.call("destroy_weight_group", GroupNameArgs(group_name)), EngineState)

    async def get_weight_version(self) -> str:
        return await self.call("get_weight_version")

    async def set_weight_version(self, version: str) -> str:
        """Relabel the weights in place; nothing is aborted."""
        return await self.call("set_weight_version", VersionArgs(version))

    async def reset_prefix_cache(self) -> int:
        """Drop every cached block no request holds; returns how many. Never fails."""
        return await self.call("reset_prefix_cache")

    async def sleep(self, level: int = 1) -> EngineState:
        """Needs a paused engine. Level 1 frees the KV cache; level 2 also the weights' device memory."""
        return msgspec.convert(await self.call("sleep", SleepArgs(level), WEIGHTS_TIMEOUT_S), EngineState)

    async def wake_up(self, tags: Optional[list[str]] = None) -> EngineState:
        """Bring back what sleep freed (`tags`: "weights", "kv_cache"; None: both)."""
        return msgspec.convert(await self.call("wake_up", WakeUpArgs(tags), WEIGHTS_TIMEOUT_S), EngineState)

    async def is_sleeping(self) -> bool:
        return bool(await self.call("is_sleeping"))


class BlockingWeightCalls:
    """`WeightCalls`, blocking: mixed into `Client`, whose `_run` and `_async` they use."""

    def update_weights(self, *args: Any, **kwargs: Any) -> WeightUpdateResult:
        return self._run(self._async.update_weights(*args, **kwargs))

    def init_weight_group(self, *args: Any, **kwargs: Any) -> EngineState:
        return self._run(self._async.init_weight_group(*args, **kwargs))

    def destroy_weight_group(self, group_name: str = DEFAULT_GROUP_NAME) -> EngineState:
        return self._run(self._async.destroy_weight_group(group_name))

    def get_weight_version(self) -> str:
        return self._run(self._async.get_weight_version())

    def set_weight_version(self, version: str) -> str:
        return self._run(self._async.set_weight_version(version))

    def reset_prefix_cache(self) -> int:
        return self._run(self._async.reset_prefix_cache())

    def sleep(self, level: int = 1) -> EngineState:
        return self._run(self._async.sleep(level))

    def wake_up(self, tags: Optional[list[str]] = None) -> EngineState:
        return self._run(self._async.wake_up(tags))

    def is_sleeping(self) -> bool:
        return self._run(self._async.is_sleeping())
