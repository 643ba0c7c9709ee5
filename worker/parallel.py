"""Tensor parallelism over `torch.distributed`: gloo on CPU, NCCL on CUDA.

transformers shards the model (`DistributedConfig(tp_size=N)`); each rank's attention sees its
local heads and its KV pool holds `num_kv_heads // N` heads. Every rank runs every forward in
lockstep; the logits are gathered to the full vocabulary, and only rank 0 samples.
"""

import inspect
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

INIT_TIMEOUT = timedelta(seconds=120)


def init_tensor_parallel(run_dir: str, rank: int, world_size: int, device_type: str) -> torch.device:
    """Join the process group (rendezvous through a file in `run_dir`); returns this rank's device."""
    # transformers reads these to bind the local device when it builds its mesh.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    device = torch.device("cpu")
    if device_type == "cpu":
        # The ranks share the machine's cores: more threads than cores make every rank wait.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    logger.info("rank %d/%d joining the %s process group", rank, world_size, backend)
    dist.init_process_group(
        backend=backend,
        init_method="file://" + os.path.join(run_dir, "dist-init"),
        rank=rank,
        world_size=world_size,
        timeout=INIT_TIMEOUT,
    )
    return device


def tp_load_kwargs(tp_size: int) -> dict:
    """`from_pretrained` arguments that shard the model: `distributed_config` where transformers
    takes `tp_size` there (5.23), else the older `tp_plan="auto"`."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto", "tp_size": tp_size}
    if "tp_size" not in inspect.signature(DistributedConfig).parameters:
        return {"tp_plan": "auto", "tp_size": tp_size}
    return {"distributed_config": DistributedConfig(tp_size=tp_size)}


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks (e.g. KV blocks, so every rank's pool has the same size)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def shutdown_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
