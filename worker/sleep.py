"""Sleep: free the KV cache's memory (level 1) and also take the weights off the device (level 2).

Memory is freed by resizing storages to zero bytes, so every tensor and view over them (the
fused projections, the layers' references, the pointers the C kernels read at each call) stays
the same object and sees the memory again after wake. The KV cache comes back zeroed: the core
prefills every request again. On CUDA the weights wait in host memory and come back as they
were. On CPU, where host memory is the device, level 2 drops them: wake needs updates that
wrote every parameter again first.
"""

import logging
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from protocol.weights import SleepTag
from worker.host_memory import return_freed_memory
from worker.kv_cache import KVCache
from worker.weights import ModelWeights, Target, WeightError

logger = logging.getLogger(__name__)


@dataclass
class Storage:
    """A block of device memory and the size to give it back."""

    storage: torch.UntypedStorage
    nbytes: int
    backup: torch.Tensor | None = None  # host copy of the weights (CUDA)

    def free(self) -> None:
        self.storage.resize_(0)

    def restore(self) -> None:
        self.storage.resize_(self.nbytes)
        if self.backup is not None:
            self.storage.copy_(self.backup.untyped_storage())
            self.backup = None


@dataclass
class DeviceMemory:
    weights: ModelWeights
    kv_cache: KVCache
    device: torch.device
    asleep: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)  # keys not written since level 2 dropped them (CPU)
    _kv: list[Storage] = field(default_factory=list)
    _weights: dict[int, Storage] = field(default_factory=dict)  # by its address before it was freed
    _storage_of_key: dict[str, int] = field(default_factory=dict)

    def sleep(self, level: int) -> None:
        if "kv_cache" not in self.asleep:
            tensors = self.kv_cache.keys + self.kv_cache.values
            self._kv = [Storage(t.untyped_storage(), t.untyped_storage().nbytes()) for t in tensors]
            for storage in self._kv:
                storage.free()
            self.asleep.add("kv_cache")
        if level >= 2 and "weights" not in self.asleep:
            self._free_weights()
            self.asleep.add("weights")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed memory back to the driver, for other processes
        else:
            return_freed_memory()  # the heap keeps freed blocks (`worker.host_memory`)
        logger.info("asleep: %s", ", ".join(sorted(self.asleep)))

    def wake(self, tags: list[SleepTag]) -> None:
        if "weights" in tags and "weights" in self.asleep:
            if self.dropped:
                missing = ", ".join(sorted(self.dropped)[:3]) + (", ..." if len(self.dropped) > 3 else "")
                raise WeightError(
                    f"sleep(level=2) dropped the weights on CPU: update_weights must write every parameter "
                    f"before wake_up ({len(self.dropped)} not written yet: {missing})"
                )
            for storage in self._weights.values():
                storage.restore()
            self._weights, self._storage_of_key = {}, {}
            self.asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            for storage in self._kv:
                storage.restore()
            for tensor in self.kv_cache.keys + self.kv_cache.values:
                tensor.zero_()
            self._kv = []
            self.asleep.discard("kv_cache")
        logger.info("awake: %s asleep", ", ".join(sorted(self.asleep)) or "nothing")

    def prepare_writes(self, targets: list[Target]) -> None:
        """Before an update: on CUDA the weights must be awake; on CPU, dropped memory is given
        back to the parameters it writes (their other values stay dropped until written)."""
        if "weights" not in self.asleep:
            return
        if self.device.type == "cuda":
            raise WeightError("the weights sleep (level 2): wake_up(tags=['weights']) before update_weights")
        for target in targets:
            storage = self._weights.get(self._storage_of_key[target.key])
            if storage is not None and storage.storage.nbytes() == 0:
                storage.restore()

    def written(self, keys: set[str]) -> None:
        """An update committed: these parameters hold real values again."""
        self.dropped -= keys

    def _free_weights(self) -> None:
        """Free each parameter's memory once (fused projections share one): to host memory on
        CUDA, dropped on CPU. The updates' host buffers for old values go too."""
        self.weights.release_backups()
        for name, param in self.weights.params.items():
            key = self.weights.keys[name]
            local = param.to_local() if isinstance(param, DTensor) else param
            if not local.untyped_storage().resizable():
                if isinstance(param, DTensor):
                    raise WeightError(f"the memory of {name!r} cannot be freed")
                param.data = param.data.clone()  # loaded over a file mapping: own the memory
            storage = local.untyped_storage()
            storage_id = storage.data_ptr()
            self._storage_of_key[key] = storage_id
            if storage_id not in self._weights:
                self._weights[storage_id] = Storage(storage, storage.nbytes())
        for storage in self._weights.values():
            if self.device.type == "cuda":
                storage.backup = torch.empty(storage.nbytes, dtype=torch.uint8, pin_memory=True)
                storage.backup.untyped_storage().copy_(storage.storage)
            storage.free()
        if self.device.type != "cuda":
            self.dropped = set(self.weights.keys.values())
