"""The worker's malloc settings on CPU, each in a fresh python (they change the process's heap)."""

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Minor page faults of each of 8 rounds of allocating (and writing) 64 + 12 MiB and freeing them,
# then the resident memory given back by return_freed_memory() after freeing 256 MiB.
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from worker.host_memory import keep_freed_memory, return_freed_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    rounds = []
    for _ in range(8):
        before = faults()
        a, b = torch.ones(16 * 2**20), torch.ones(3 * 2**20)
        del a, b
        rounds.append(faults() - before)
    big = torch.ones(64 * 2**20)
    del big
    kept = resident_mib()
    return_freed_memory()
    print(max(rounds[-2:]), kept - resident_mib())
    """
)


def probe(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    reuse, returned = out.stdout.split()
    return int(reuse), float(returned)


def test_freed_blocks_are_reused_without_page_faults_and_returned_on_request():
    default_faults, _ = probe("default")
    kept_faults, returned_mib = probe("keep")
    assert default_faults > 10_000  # 64 MiB mapped afresh each round: a fault per 4 KiB page
    # The heap's free blocks grow and merge over the first rounds until one fits (alignment).
    assert kept_faults < 1_000
    assert returned_mib > 200  # of the 256 MiB freed
