"""The paged KV pool: per layer, K and V tensors `[num_blocks * block_size, num_kv_heads_local, head_dim]`.

Slot `block_id * block_size + offset` holds one token's K/V. The core owns block allocation;
every block, 0 included, may hold tokens.
"""

import logging
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from protocol.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int
    num_blocks: int

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_idx], self.values[layer_idx]


def kv_shape(model_config: PretrainedConfig, tp_size: int) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads on this rank, head_dim)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return model_config.num_hidden_layers, kv_heads // tp_size, head_dim


def free_memory_bytes(device: torch.device) -> int:
    """Free device memory: CUDA's free bytes, or the machine's MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable missing from /proc/meminfo")


def num_blocks_for(config: EngineConfig, model_config: PretrainedConfig, tp_size: int) -> int:
    """Blocks on this rank that fit in `config.kv_cache_memory` (bytes when > 1, else a fraction of
    free memory). With TP the ranks then agree on the minimum (`parallel.min_across_ranks`)."""
    layers, kv_heads, head_dim = kv_shape(model_config, tp_size)
    itemsize = torch_dtype(config.dtype).itemsize
    bytes_per_block = 2 * layers * config.block_size * kv_heads * head_dim * itemsize
    memory = config.kv_cache_memory
    budget = memory if memory > 1 else memory * free_memory_bytes(torch.device(config.device))
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(f"--kv-cache-memory {memory} leaves no room for one KV block")
    return num_blocks


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def allocate_kv_cache(
    num_blocks: int, block_size: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> KVCache:
    """`shape` is `kv_shape(...)`: (num_layers, num_kv_heads on this rank, head_dim)."""
    layers, kv_heads, head_dim = shape
    shape = (num_blocks * block_size, kv_heads, head_dim)
    keys = [_cache_tensor(shape, dtype, device) for _ in range(layers)]
    values = [_cache_tensor(shape, dtype, device) for _ in range(layers)]
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens), %.1f MiB",
        num_blocks, block_size, num_blocks * block_size,
        2 * layers * keys[0].numel() * dtype.itemsize / 2**20,
    )
    return KVCache(keys=keys, values=values, block_size=block_size, num_blocks=num_blocks)


def _cache_tensor(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One layer's keys or values, zeroed: the torch attention path gathers slot 0 as padding (and
    masks it out), so it must hold finite numbers. On the CPU the zeroing also takes every page's
    first-touch fault at start-up (0.5-2.2 s for SmolLM2's 2.2 GiB on a 2-core VM, by how much of
    the memory the VM's host had mapped), not in the steps that first write it: left untouched, the
    fp32 benchmark's 4803-token prefill spent 1.02 s in attention, of which its kernel took 0.38."""
    return torch.zeros(shape, dtype=dtype, device=device)


def max_model_len_for(configured: int | None, model_config: PretrainedConfig, num_blocks: int, block_size: int) -> int:
    model_limit = configured or getattr(model_config, "max_position_embeddings", None) or num_blocks * block_size
    return min(model_limit, num_blocks * block_size)
