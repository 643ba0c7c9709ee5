"""One tensor-parallel rank for test_parallel: runs the toy core, rank 0 shares each result."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402

from worker.parallel import init_tensor_parallel, shutdown_tensor_parallel  # noqa: E402
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt  # noqa: E402


class SharedResults:
    """Rank 0 samples; every rank needs the tokens, so rank 0 broadcasts its StepResult."""

    def __init__(self, runner):
        self.runner = runner

    def execute(self, plan):
        box = [self.runner.execute(plan)]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def main(folder: str, run_dir: str, rank: int, out: str) -> None:
    init_tensor_parallel(run_dir, rank, 2, "cpu")
    try:
        runner = make_runner(folder, tp_size=2, is_driver=rank == 0)
        reqs = [Req("a", prompt(1, 5), 6), Req("b", prompt(2, 13), 6, chunk=4, arrival=1)]
        done = ToyCore(SharedResults(runner)).run(reqs)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({rid: r.output for rid, r in done.items()}, f)
    finally:
        shutdown_tensor_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
