"""A trainer process for the weight-group tests: hosts group `name` as rank 0, broadcasts the
tensors of a safetensors checkpoint, and with `--die-after N` exits abruptly after N of them.

    python trainer_child.py PORT WORLD_SIZE NAME CHECKPOINT [--die-after N]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from frontend.weight_sync import TrainerWeightGroup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("world_size", type=int)
    parser.add_argument("name")
    parser.add_argument("checkpoint")
    parser.add_argument("--die-after", type=int, default=None)
    args = parser.parse_args()
    state_dict = load_file(args.checkpoint)
    group = TrainerWeightGroup.create("127.0.0.1", args.port, args.world_size, args.name, timeout_s=60)
    print("joined", flush=True)
    for sent, tensor in enumerate(state_dict.values()):
        if sent == args.die_after:
            os._exit(3)  # no clean-up: the engine sees a trainer that died mid-broadcast
        dist.broadcast(tensor, src=0, group=group.group)
    group.destroy()


if __name__ == "__main__":
    main()
